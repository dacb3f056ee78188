"""Checks captured exchanges against Tollgate's OpenAPI documents (see scripts/openapi-check).

In: a JSON file {"documents": {name: document}, "exchanges": [{"document", "method", "path",
"request", "status", "contentType", "body"}]}. Out: one line per document, a line per
failure, exit 1 if there is any.
"""

import json
import sys

from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate


def operation_for(document, method, path):
    """The documented path template and operation a concrete path resolves to."""
    segments = path.split("?")[0].split("/")
    for template, item in document["paths"].items():
        parts = template.split("/")
        if len(parts) != len(segments):
            continue
        if all(p == s or (p.startswith("{") and s) for p, s in zip(parts, segments)):
            operation = item.get(method)
            if operation is not None:
                return template, operation
    return None, None


def schema_errors(document, schema, value):
    # The document is the root, so "#/components/schemas/..." references resolve.
    root = dict(schema)
    root["components"] = document.get("components", {})
    validator = OAS31Validator(root)
    return [
        f"{'/'.join(str(p) for p in error.absolute_path) or '(body)'}: {error.message}"
        for error in validator.iter_errors(value)
    ]


def main(path):
    with open(path, encoding="utf-8") as file:
        capture = json.load(file)
    failures = []
    exercised = {name: set() for name in capture["documents"]}
    for name, document in capture["documents"].items():
        try:
            validate(document)
        except Exception as error:  # the validator's own error types vary by version
            failures.append(f"{name}: the document is not valid OpenAPI: {error}")
    for exchange in capture["exchanges"]:
        name = exchange["document"]
        document = capture["documents"][name]
        where = f"{name}: {exchange['method'].upper()} {exchange['path']} -> {exchange['status']}"
        template, operation = operation_for(document, exchange["method"], exchange["path"])
        if operation is None:
            failures.append(f"{where}: no documented operation")
            continue
        exercised[name].add((exchange["method"], template))
        request = exchange.get("request")
        if request is not None and 200 <= exchange["status"] < 300:
            content = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if content is None:
                failures.append(f"{where}: a body was sent but none is documented")
            else:
                failures += [f"{where}: request {e}" for e in schema_errors(document, content["schema"], request)]
        answer = operation["responses"].get(str(exchange["status"]))
        if answer is None:
            failures.append(f"{where}: status not documented (documented: {', '.join(operation['responses'])})")
            continue
        media = (exchange.get("contentType") or "").split(";")[0].strip()
        contents = answer.get("content", {})
        if not contents:
            if exchange.get("body") not in (None, ""):
                failures.append(f"{where}: a body was answered but none is documented")
            continue
        if media not in contents:
            failures.append(f"{where}: media type {media!r} not documented ({', '.join(contents)})")
            continue
        schema = contents[media].get("schema")
        if schema is not None and media.endswith("json"):
            failures += [f"{where}: answer {e}" for e in schema_errors(document, schema, exchange["body"])]
    for name, document in capture["documents"].items():
        documented = {(m, t) for t, item in document["paths"].items() for m in item if m in
                      ("get", "put", "post", "patch", "delete")}
        missing = sorted(documented - exercised[name])
        for method, template in missing:
            failures.append(f"{name}: {method.upper()} {template} was never exercised")
        answers = sum(1 for e in capture["exchanges"] if e["document"] == name)
        print(f"openapi-check: {name}: valid OpenAPI {document['openapi']}, {len(documented)} operations, "
              f"{answers} answers checked")
    for failure in failures:
        print(f"openapi-check: FAIL {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
