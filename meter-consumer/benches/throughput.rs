//! Sustained Kafka → ClickHouse throughput and freshness of meter-consumer, on this machine,
//! with the broker and ClickHouse on the same cores, against baselines measured in the same
//! run. Not run by `cargo test`; run it with
//! `cargo bench -p tollgate-meter-consumer --bench throughput` (the native stack must be up).
//!
//! - Baselines: producing the events to Kafka (`acks=all`); inserting the same rows into a
//!   plain copy of `usage_events` with no Kafka, no decoding and no rollups, in batches of
//!   the same size; and inserting the same rows into copies of every table the consumer
//!   writes (raw, the four rollups, minutes touched), the rollup rows computed beforehand, so
//!   that ratio is the consumer against the same inserts with nothing else.
//! - CPU per event: user + system time from `/proc/<pid>/stat` of the Kafka broker, the
//!   ClickHouse server and this process (the consumer, plus this benchmark's polling) over
//!   the consuming phase, divided by the events consumed. The servers are shared with
//!   whatever else runs on the machine: run it on a quiet one.
//! - Throughput: the events are produced first, then the consumer (in-process, default batch
//!   settings) starts; the rate is measured from the first stored row to the last row
//!   visible in every table (raw and every rollup), and also from the consumer's start.
//!   Traffic is steady (no late events): every late event cuts a batch at its month.
//! - Steady CPU: with the consumer caught up, events are produced at a steady rate for 10 s
//!   (each timestamped when produced); CPU per event of the broker, ClickHouse and the
//!   consumer from the first event sent until the minute rollup counts the last (polled once a
//!   second). This process also produces them: its CPU for producing the same stream alone,
//!   measured just before, is taken off its figure.
//! - Freshness: the same steady stream again, the minute rollup polled every 20 ms; an event's
//!   freshness is when the rollup first counts it minus when it was produced.
//!
//! `TOLLGATE_BENCH_EVENTS` (default 400000) and `TOLLGATE_BENCH_RATE` (events/s of the steady
//! phases, default 10000) size it.

use std::time::{Duration, Instant};

use support::{produce, producer, Env, Workload};
use tollgate_meter_consumer::rows::{Origin, UsageRow};
use tollgate_runtime::shutdown::Shutdown;
use tollgate_test_support::meter as support;

/// The service binary's allocator (`src/main.rs`), so the consumer runs here as it does there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn count(client: &clickhouse::Client, sql: &str) -> u64 {
    client
        .query(sql)
        .fetch_one::<u64>()
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// CPU seconds (user + system) a process has used, from `/proc/<pid>/stat`; clock ticks
/// are 100 per second on Linux (`getconf CLK_TCK`).
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces, in parentheses).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// The first process whose command line contains `needle`.
fn find_process(needle: &str) -> Option<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        (pid != me && cmdline.contains(needle) && !cmdline.contains("bash")).then_some(pid)
    })
}

/// CPU seconds of the broker, ClickHouse and this process, now.
fn cpu_now(pids: &[(&'static str, Option<u32>)]) -> Vec<f64> {
    pids.iter().map(|(_, pid)| pid.map_or(0.0, cpu_secs)).collect()
}

/// Sends `count` copies of `template` at `rate` per second, spread over `partitions`, each
/// with a fresh id, tenant `tenant` and the time it is sent; returns when each was handed to
/// the producer (delivery is awaited in the background).
async fn steady_stream(
    kafka: &rdkafka::producer::FutureProducer,
    (topic, partitions): (&str, u64),
    template: &tollgate_schemas::UsageEvent,
    tenant: &str,
    rate: u64,
    count: u64,
) -> Vec<Instant> {
    let mut event = template.clone();
    event.tenant_id = Some(tenant.to_owned());
    let mut sent = Vec::with_capacity(count as usize);
    let mut payload = Vec::with_capacity(256);
    let start = Instant::now();
    for i in 0..count {
        let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
        tokio::time::sleep_until(due.into()).await;
        event.event_id = uuid::Uuid::now_v7();
        event.timestamp_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        payload.clear();
        tollgate_schemas::encode_usage_event(&event, &mut payload);
        let record = rdkafka::producer::FutureRecord::to(topic)
            .key("steady-key")
            .payload(&payload)
            .partition((i % partitions) as i32);
        let delivery = kafka.send_result(record).map_err(|(e, _)| e).expect("enqueued");
        tokio::spawn(delivery);
        sent.push(Instant::now());
    }
    sent
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let events = env_u64("TOLLGATE_BENCH_EVENTS", 400_000);
    let rate = env_u64("TOLLGATE_BENCH_RATE", 10_000);
    let env = Env::new("meter_bench", 4).await;
    let settings: tollgate_meter_consumer::MeterSettings = env.settings(&env.clickhouse, 50_000, 1_000);
    let client = env.client();

    // Baseline 1: Kafka produce rate.
    let workload = Workload::with_late_runs(7, events, false);
    let kafka = producer(&env.brokers);
    let started = Instant::now();
    produce(&kafka, &env.usage, &workload.events, None).await;
    let produce_rate = events as f64 / started.elapsed().as_secs_f64();

    // Baseline 2: plain ClickHouse inserts of the same rows.
    let server = clickhouse::Client::default()
        .with_url(&env.clickhouse)
        .with_validation(false);
    server
        .query(&format!("CREATE DATABASE {}", env.database))
        .execute()
        .await
        .expect("database");
    tollgate_meter_consumer::schema::migrate(&client).await.expect("schema");
    client
        .query("CREATE TABLE baseline AS usage_events")
        .execute()
        .await
        .expect("baseline table");
    // By the way: Avro decoding into rows alone, on one thread, with the consumer's
    // hand-written reader; and the generic reader on the same bytes, for the ratio.
    let started = Instant::now();
    for (_, bytes) in &workload.events {
        std::hint::black_box(tollgate_schemas::decode::<tollgate_schemas::UsageEvent>(bytes).expect("decodes"));
    }
    let generic_decode_rate = events as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    let topic: std::sync::Arc<str> = env.usage.as_str().into();
    let rows: Vec<UsageRow> = workload
        .events
        .iter()
        .enumerate()
        .map(|(i, (_, bytes))| {
            let event = tollgate_schemas::decode_usage_event(bytes).expect("decodes");
            UsageRow::from_event(
                &event,
                &topic,
                Origin {
                    partition: 0,
                    offset: i as i64,
                },
            )
            .expect("row")
        })
        .collect();
    let decode_rate = events as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    for chunk in rows.chunks(settings.batch.max_rows as usize) {
        let mut insert = client.insert::<UsageRow>("baseline").await.expect("insert");
        for row in chunk {
            insert.write(row).await.expect("write");
        }
        insert.end().await.expect("end");
    }
    let insert_rate = events as f64 / started.elapsed().as_secs_f64();

    // Baseline 3: the same rows into copies of every table the consumer writes.
    use tollgate_meter_consumer::batch;
    use tollgate_meter_consumer::sink::Table;
    for table in Table::ALL {
        client
            .query(&format!("CREATE TABLE baseline_{0} AS {0}", table.name()))
            .execute()
            .await
            .expect("baseline table");
    }
    let chunks: Vec<_> = rows
        .chunks(settings.batch.max_rows as usize)
        .map(|chunk| {
            let topic = env.usage.as_str();
            (
                chunk,
                batch::meter_minute(topic, chunk),
                batch::meter_hour(topic, chunk),
                batch::meter_day(topic, chunk),
                batch::route_day(topic, chunk),
                batch::minutes_touched(topic, chunk),
            )
        })
        .collect();
    async fn insert_all<R: clickhouse::RowOwned + clickhouse::RowWrite + serde::Serialize>(
        client: &clickhouse::Client,
        table: Table,
        rows: &[R],
    ) {
        let mut insert = client
            .insert::<R>(&format!("baseline_{}", table.name()))
            .await
            .expect("insert");
        for row in rows {
            insert.write(row).await.expect("write");
        }
        insert.end().await.expect("end");
    }
    let started = Instant::now();
    for (raw, minute, hour, day, route, touched) in &chunks {
        insert_all(&client, Table::Raw, raw).await;
        tokio::join!(
            insert_all(&client, Table::MeterMinute, minute),
            insert_all(&client, Table::MeterHour, hour),
            insert_all(&client, Table::MeterDay, day),
            insert_all(&client, Table::RouteDay, route),
        );
        insert_all(&client, Table::MinutesTouched, touched).await;
    }
    let same_tables_rate = events as f64 / started.elapsed().as_secs_f64();
    drop(chunks);
    drop(rows);

    let pids = [
        ("kafka broker", find_process("kafka.Kafka")),
        ("clickhouse", find_process("clickhouse-server")),
        ("meter-consumer (this process)", Some(std::process::id())),
    ];

    // The consumer, from a standing start on a full topic.
    let cpu_before = cpu_now(&pids);
    let consumer_start = Instant::now();
    let shutdown = Shutdown::default();
    let consumer = tokio::spawn({
        let (settings, shutdown) = (settings.clone(), shutdown.clone());
        async move {
            tollgate_meter_consumer::run(settings, shutdown)
                .await
                .expect("meter-consumer runs")
        }
    });
    let mut first_row = None;
    // Every table must hold every event: the raw rows, and the `requests` meter (one per
    // event) in each rollup.
    let everywhere = [
        "SELECT count() FROM usage_events",
        "SELECT toUInt64(sum(events)) FROM usage_route_day",
        "SELECT toUInt64(sum(events)) FROM usage_meter_minute WHERE meter = 'requests'",
        "SELECT toUInt64(sum(events)) FROM usage_meter_hour WHERE meter = 'requests'",
        "SELECT toUInt64(sum(events)) FROM usage_meter_day WHERE meter = 'requests'",
    ];
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if first_row.is_none() && count(&client, "SELECT count() FROM usage_events").await > 0 {
            first_row = Some(Instant::now());
        }
        let mut stored = u64::MAX;
        for sql in everywhere {
            stored = stored.min(count(&client, sql).await);
        }
        if stored >= events {
            break;
        }
        assert!(Instant::now() < deadline, "not consumed within 5 minutes");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cpu_after = cpu_now(&pids);
    let consume_secs = first_row.expect("rows appeared").elapsed().as_secs_f64();
    let consume_rate = events as f64 / consume_secs;
    let cold_rate = events as f64 / consumer_start.elapsed().as_secs_f64();

    let template = tollgate_schemas::decode::<tollgate_schemas::UsageEvent>(&workload.events[0].1).unwrap();
    let steady_events = rate * 10;

    // Steady traffic, CPU: first the producing alone (to the DLQ topic, which nothing here
    // reads), for what this process spends on it; then the same stream consumed, polled once a
    // second so the polling's queries stay out of ClickHouse's figure.
    let own = [("bench producer", Some(std::process::id()))];
    let producer_before = cpu_now(&own);
    steady_stream(&kafka, (&env.dlq, 1), &template, "idle", rate, steady_events).await;
    let producer_us = (cpu_now(&own)[0] - producer_before[0]) * 1e6 / steady_events as f64;
    let steady_before = cpu_now(&pids);
    steady_stream(&kafka, (&env.usage, 4), &template, "steady", rate, steady_events).await;
    let steady_sql =
        "SELECT toUInt64(sum(events)) FROM usage_meter_minute WHERE tenant_id = 'steady' AND meter = 'requests'";
    let steady_deadline = Instant::now() + Duration::from_secs(120);
    while count(&client, steady_sql).await < steady_events {
        assert!(
            Instant::now() < steady_deadline,
            "steady events not counted within 2 minutes"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let steady_after = cpu_now(&pids);

    // Freshness: the same stream (tenant `fresh`), the minute rollup polled every 20 ms.
    let fresh_events = steady_events;
    let poller = tokio::spawn({
        let client = env.client();
        async move {
            let mut seen: Vec<(Instant, u64)> = Vec::new();
            loop {
                let n = count(
                    &client,
                    "SELECT toUInt64(sum(events)) FROM usage_meter_minute WHERE tenant_id = 'fresh' AND meter = 'requests'",
                )
                .await;
                seen.push((Instant::now(), n));
                if n >= fresh_events {
                    return seen;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    let produced_at = steady_stream(&kafka, (&env.usage, 4), &template, "fresh", rate, fresh_events).await;
    let seen = tokio::time::timeout(Duration::from_secs(120), poller)
        .await
        .expect("fresh events visible")
        .expect("poller");
    let mut ages: Vec<f64> = produced_at
        .iter()
        .enumerate()
        .map(|(i, at)| {
            let visible = seen
                .iter()
                .find(|(_, n)| *n > i as u64)
                .map(|(t, _)| *t)
                .expect("counted");
            visible.saturating_duration_since(*at).as_secs_f64()
        })
        .collect();
    ages.sort_by(f64::total_cmp);

    shutdown.trigger();
    consumer.await.expect("consumer stops");
    env.drop_database().await;

    println!("meter-consumer throughput ({events} events, 4 partitions, batch 50000 rows / 1000 ms, 2 cores shared with Kafka and ClickHouse)");
    println!("  baseline kafka produce     {produce_rate:>10.0} events/s");
    println!("  baseline plain CH insert   {insert_rate:>10.0} rows/s (raw table only, no decode, no rollups)");
    println!("  baseline decode, 1 thread  {decode_rate:>10.0} events/s (Avro -> rows, no IO)");
    println!(
        "  generic Avro reader         {generic_decode_rate:>10.0} events/s (decode only: hand-written reader into rows {:.2}x)",
        decode_rate / generic_decode_rate
    );
    println!("  baseline same tables       {same_tables_rate:>10.0} rows/s (raw + 4 rollups + minutes touched, rollups precomputed)");
    println!(
        "  kafka -> clickhouse        {consume_rate:>10.0} events/s (raw + 4 rollups + minutes touched, exactly once)"
    );
    println!("  same, from process start   {cold_rate:>10.0} events/s (including group join and the first batch wait)");
    println!("  ratio vs plain insert      {:>10.2}", consume_rate / insert_rate);
    println!("  ratio vs same-tables insert{:>10.2}", consume_rate / same_tables_rate);
    let mut total_us = 0.0;
    for (i, (name, pid)) in pids.iter().enumerate() {
        let us = (cpu_after[i] - cpu_before[i]) * 1e6 / events as f64;
        total_us += us;
        let pid = pid.map_or("not found".to_owned(), |p| p.to_string());
        println!("  cpu per event {name:<30} {us:>7.2} us (pid {pid})");
    }
    println!("  cpu per event, pipeline total            {total_us:>7.2} us (consuming a full topic)");
    println!("  ratio vs produce           {:>10.2}", consume_rate / produce_rate);
    println!("steady {rate} events/s for 10 s, cpu per event from the first event sent to the last counted:");
    let mut steady_total = 0.0;
    for (i, (name, pid)) in pids.iter().enumerate() {
        let mut us = (steady_after[i] - steady_before[i]) * 1e6 / steady_events as f64;
        if pid == &own[0].1 {
            us -= producer_us;
        }
        steady_total += us;
        println!("  cpu per event {name:<30} {us:>7.2} us");
    }
    println!("  (this process less its producing alone at the same rate: {producer_us:.2} us per event)");
    println!("  cpu per event, pipeline total            {steady_total:>7.2} us (steady {rate} events/s)");
    println!(
        "freshness at {rate} events/s (produced -> counted in usage_meter_minute): p50 {:.3} s, p99 {:.3} s, max {:.3} s",
        percentile(&ages, 0.5),
        percentile(&ages, 0.99),
        ages.last().copied().unwrap_or_default()
    );
}
