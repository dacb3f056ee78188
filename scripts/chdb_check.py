#!/usr/bin/env python3
"""Replays what the Tollgate services sent to ClickHouse 18.16 on the current ClickHouse (chDB).

In: a capture file written by `tests/tests/clickhouse_sql.rs` (TOLLGATE_SQL_CAPTURE): every
statement the services' code sent, in order, with its database and settings; the tables'
contents after that run; and the finance-view checks with the answers expected from the
input. Out: one line per refused statement or wrong view, a summary line, and the exit
status: 0 when the current engine accepts every statement and every view gives the
expected rows, 1 otherwise, 2 when the capture cannot be read.

Phases, in one chDB session (its own data directory, deleted after):
1. every statement in order, each under the database and settings it was sent with (an
   INSERT's rows travelled in RowBinary and were not recorded: its target and column list
   are checked by inserting zero rows);
2. the tables loaded with the contents 18.16 held at the end;
3. every distinct read statement again, now over those rows;
4. each view check: its rows must equal the expected TabSeparated text.
"""

import json
import re
import shutil
import sys
import tempfile

from chdb import session

INSERT_ROWS = re.compile(r"^\s*INSERT\s+INTO\s+(\S+?)\s*\((.*)\)\s*FORMAT\s+\w+\s*$", re.S | re.I)
READ = re.compile(r"^\s*(SELECT|WITH)\b", re.I)


def sql_string(text):
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def setting_value(value):
    return value if re.fullmatch(r"-?\d+", value) else sql_string(value)


def excerpt(sql, width=160):
    flat = " ".join(sql.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def first_line(error, width=400):
    line = next((line for line in str(error).splitlines() if line.strip()), str(error))
    return line if len(line) <= width else line[: width - 1] + "…"


class Replay:
    def __init__(self, path, timezone):
        self.session = session.Session(path)
        # The server's zone, so `DateTime` columns without one mean what they meant there.
        self.session.query(f"SET session_timezone = {sql_string(timezone)}")
        self.database = None
        self.failures = []
        self.failed = set()

    def query(self, sql, fmt="TabSeparated"):
        return self.session.query(sql, fmt).bytes().decode("utf-8")

    def use(self, database):
        if database and database != self.database:
            self.query(f"USE {database}")
            self.database = database

    def statement(self, index, sent):
        sql = sent["sql"]
        try:
            self.use(sent.get("database"))
            for name, value in sorted(sent.get("settings", {}).items()):
                self.query(f"SET {name} = {setting_value(value)}")
            rows = INSERT_ROWS.match(sql)
            if rows:
                table, columns = rows.group(1), rows.group(2)
                self.query(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {table} WHERE 0")
            else:
                self.query(sql)
        except Exception as error:  # chDB raises its own error types; any refusal counts.
            self.failed.add(index)
            self.failures.append(f"statement {index}: {excerpt(sql)}\n    {first_line(error)}")

    def load(self, database, table, contents):
        if not contents["rows"]:
            return
        structure, select = [], []
        for name, kind in contents["columns"]:
            quoted = f"`{name}`"
            if kind.startswith("DateTime"):
                # Exported as Unix seconds (see the test's `write_capture`).
                structure.append(f"{quoted} UInt32")
                select.append(f"toDateTime({quoted})")
            else:
                structure.append(f"{quoted} {kind}")
                select.append(quoted)
        try:
            self.query(
                f"INSERT INTO {database}.{table} SELECT {', '.join(select)} "
                f"FROM format(TabSeparated, {sql_string(', '.join(structure))}, {sql_string(contents['rows'])})"
            )
        except Exception as error:
            self.failures.append(f"loading {table}: {first_line(error)}")


def main(argv):
    if len(argv) != 2:
        print("usage: chdb_check.py CAPTURE.json", file=sys.stderr)
        return 2
    try:
        with open(argv[1], encoding="utf-8") as f:
            capture = json.load(f)
        statements = capture["statements"]
        database = capture["database"]
    except (OSError, ValueError, KeyError) as error:
        print(f"chdb-check: {argv[1]}: cannot read the capture: {error}", file=sys.stderr)
        return 2
    if not statements:
        print(f"chdb-check: {argv[1]}: the capture holds no statement", file=sys.stderr)
        return 2

    path = tempfile.mkdtemp(prefix="tollgate-chdb-")
    try:
        replay = Replay(path, capture.get("server_timezone") or "UTC")
        version = replay.query("SELECT version()").strip()
        for index, sent in enumerate(statements):
            replay.statement(index, sent)
        for table, contents in sorted(capture.get("tables", {}).items()):
            replay.load(database, table, contents)
        reads = {}
        for index, sent in enumerate(statements):
            if READ.match(sent["sql"]):
                reads.setdefault(sent["sql"], (index, sent))
        for index, sent in reads.values():
            if index not in replay.failed:
                replay.statement(index, sent)
        replay.use(database)
        views = 0
        for check in capture.get("checks", []):
            try:
                got = replay.query(check["sql"])
            except Exception as error:
                replay.failures.append(f"view {check['name']}: {first_line(error)}")
                continue
            if got != check["expected"]:
                replay.failures.append(
                    f"view {check['name']}: rows differ from the sums of the input\n"
                    f"    expected:\n{indent(check['expected'])}\n    got:\n{indent(got)}"
                )
            else:
                views += 1
    finally:
        shutil.rmtree(path, ignore_errors=True)

    for failure in replay.failures:
        print(f"chdb-check: {failure}")
    distinct = len({s["sql"] for s in statements})
    summary = (
        f"ClickHouse {version} (chDB) against a capture from {capture.get('server_version', '?')}: "
        f"{len(statements)} statements ({distinct} distinct), {len(capture.get('tables', {}))} tables loaded, "
        f"{views} of {len(capture.get('checks', []))} views as expected"
    )
    if replay.failures:
        print(f"chdb-check: FAILED: {len(replay.failures)} problems; {summary}")
        return 1
    print(f"chdb-check: ok: {summary}")
    return 0


def indent(text):
    return "\n".join("      " + line for line in text.splitlines())


if __name__ == "__main__":
    sys.exit(main(sys.argv))
