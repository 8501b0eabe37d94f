#!/usr/bin/env python3
"""Checks events as consumers receive them against the event contracts and CloudEvents 1.0.

Input: a JSON manifest, a list of {"name": ..., "body": "<message body as received>"}. A body is
an envelope (SNS raw delivery, a NATS message, the feed), an SNS notification wrapping one, or an
EventBridge event carrying one as `detail`. For each envelope:

  * the CloudEvents SDK (PyPI `cloudevents`) reads it from the structured JSON format, which
    checks the required attributes, `specversion`, `time`, `subject` and extension names;
  * the spec's rules the SDK leaves out: every attribute but `data` is a String, Boolean or
    Integer (signed 32-bit) value, `source` is a URI-reference (RFC 3986), `time` is RFC 3339,
    extension names have at most 20 characters, a `traceparent` is a valid W3C Trace Context;
  * JSON Schema 2020-12 (PyPI `jsonschema`, formats checked): the envelope against
    `envelope.json`, its `data` against `<type>.v<schemaversion>.json` of the schema
    directories given.

Prints a JSON report: one entry per envelope with its errors, and totals. Exit status 0 when it
could run (the caller decides what must pass); 2 on bad usage.
"""

import argparse
import json
import pathlib
import re
import sys

import jsonschema
import rfc3986_validator
from cloudevents.core.formats.json import JSONFormat

INT_MIN, INT_MAX = -(2**31), 2**31 - 1
CONTEXT = {"id", "source", "specversion", "type", "datacontenttype", "dataschema", "subject", "time"}


def valid_traceparent(value):
    if not isinstance(value, str) or len(value) < 55:
        return False
    m = re.match(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(.*)$", value)
    if not m:
        return False
    version, trace, parent, _flags, rest = m.groups()
    if version == "ff" or set(trace) == {"0"} or set(parent) == {"0"}:
        return False
    return rest == "" if version == "00" else (rest == "" or rest.startswith("-"))


def envelopes_of(body):
    """The envelopes a message body carries, whatever way it was delivered."""
    doc = json.loads(body)
    if isinstance(doc, dict) and doc.get("Type") == "Notification" and "Message" in doc:
        return [("sns-wrapped", doc["Message"])]
    if isinstance(doc, dict) and "detail-type" in doc and "detail" in doc:
        return [("eventbridge", json.dumps(doc["detail"]))]
    return [("envelope", body)]


def spec_errors(attributes):
    errors = []
    for name, value in attributes.items():
        if name in ("data", "data_base64"):
            continue
        if isinstance(value, bool) or isinstance(value, str):
            pass
        elif isinstance(value, int):
            if not INT_MIN <= value <= INT_MAX:
                errors.append(f"{name}: {value} is outside CloudEvents' Integer range")
        else:
            errors.append(f"{name}: {type(value).__name__} is not a CloudEvents type in JSON")
        if name not in CONTEXT and len(name) > 20:
            errors.append(f"{name}: an extension name longer than 20 characters")
    source = attributes.get("source")
    if isinstance(source, str) and not rfc3986_validator.validate_rfc3986(source, rule="URI_reference"):
        errors.append(f"source: {source!r} is not a URI-reference")
    if "traceparent" in attributes and not valid_traceparent(attributes["traceparent"]):
        errors.append(f"traceparent: {attributes['traceparent']!r} is not a valid W3C traceparent")
    if "tracestate" in attributes and "traceparent" not in attributes:
        errors.append("tracestate: sent without a traceparent")
    return errors


def load_schemas(dirs):
    envelope, data = None, {}
    for d in dirs:
        for path in sorted(pathlib.Path(d).glob("*.json")):
            schema = json.loads(path.read_text())
            jsonschema.Draft202012Validator.check_schema(schema)
            if path.name == "envelope.json":
                envelope = schema
                continue
            m = re.match(r"^(.+)\.v(\d+)\.json$", path.name)
            if m:
                data[(m.group(1), int(m.group(2)))] = schema
    if envelope is None:
        sys.exit("no envelope.json in the schema directories")
    return envelope, data


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--schemas", action="append", required=True)
    parser.add_argument("manifest")
    args = parser.parse_args()
    envelope_schema, data_schemas = load_schemas(args.schemas)
    formats = jsonschema.Draft202012Validator.FORMAT_CHECKER
    envelope_validator = jsonschema.Draft202012Validator(envelope_schema, format_checker=formats)
    report = {"envelopes": [], "checked": 0, "passed": 0, "failed": 0, "schemas": len(data_schemas)}
    for message in json.loads(pathlib.Path(args.manifest).read_text()):
        try:
            carried = envelopes_of(message["body"])
        except ValueError as e:
            carried = [("unreadable", None)]
            unreadable = str(e)
        for how, text in carried:
            errors = []
            if text is None:
                errors.append(f"body: not JSON ({unreadable})")
            else:
                try:
                    JSONFormat().read(None, text)
                except Exception as e:  # the SDK's validation errors
                    errors.append(f"CloudEvents SDK: {e}")
                try:
                    attributes = json.loads(text)
                except ValueError as e:
                    attributes = None
                    errors.append(f"envelope: not JSON ({e})")
                if isinstance(attributes, dict):
                    errors += spec_errors(attributes)
                    errors += [f"envelope schema: {e.json_path}: {e.message}"
                               for e in envelope_validator.iter_errors(attributes)]
                    key = (attributes.get("type"), attributes.get("schemaversion"))
                    schema = data_schemas.get(key)
                    if schema is None:
                        errors.append(f"data: no schema for {key[0]} v{key[1]}")
                    else:
                        validator = jsonschema.Draft202012Validator(schema, format_checker=formats)
                        errors += [f"data schema: {e.json_path}: {e.message}"
                                   for e in validator.iter_errors(attributes.get("data"))]
                elif attributes is not None:
                    errors.append("envelope: not a JSON object")
            report["checked"] += 1
            report["passed" if not errors else "failed"] += 1
            report["envelopes"].append({"name": message["name"], "carried": how, "errors": errors})
    json.dump(report, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
