#!/usr/bin/env python3
"""A local stand-in for the HTTP API's API Gateway: turns HTTP requests into API Gateway HTTP API
(payload v2) events for the real payment-command binary, run by `cargo lambda watch`.

What it does as API Gateway does, for the four routes of template.yaml:
  * the JWT authorizer: a bearer token is required on every route; its claims go to the function
    as `requestContext.authorizer.jwt.claims`. Tokens are HS256, signed with a local secret
    (`OUTBOX_API_JWT_SECRET`), never a real identity provider's; `exp` is checked. Without a
    valid token: 401 `{"message":"Unauthorized"}`, the function is not invoked.
  * routing: a method and path that match no route get 404 `{"message":"Not Found"}`; path
    parameters are percent-decoded, `rawPath` is kept as sent.
  * the event: headers lower-cased (repeated ones joined with commas), cookies apart, query
    parameters decoded and joined with commas, a request id of API Gateway's shape (ending in
    `=`), the body as text, or base64 when it is not UTF-8.
  * the response: the function's `statusCode`, headers, cookies and body (base64 decoded); a
    function error is 500 `{"message":"Internal Server Error"}`.

Usage:
  api_front.py serve --port 8080 --invoke-url http://127.0.0.1:9000
  api_front.py token acme          # prints a bearer token for tenant acme (valid a day)
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FUNCTION = "payment-command"
ISSUER = "https://auth.local.test/"
AUDIENCE = "payments-api"
ROUTES = [
    ("POST", "/payments/{paymentId}/paid"),
    ("POST", "/payments/{paymentId}/refunds"),
    ("GET", "/events"),
    ("POST", "/events/{eventId}/ack"),
]


def secret():
    return os.environ.get("OUTBOX_API_JWT_SECRET", "local-only-not-a-secret").encode()


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def token(tenant, lifetime=86400):
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    now = int(time.time())
    claims = {"sub": "local-user", "iss": ISSUER, "aud": AUDIENCE, "tenant_id": tenant,
              "scope": "payments:write", "iat": now, "exp": now + lifetime}
    payload = b64url(json.dumps(claims).encode())
    signature = hmac.new(secret(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(signature)}"


def claims_of(authorization):
    """The token's claims when it is a valid bearer token of ours, else None."""
    if not authorization or not authorization.startswith("Bearer "):
        return None
    parts = authorization[len("Bearer "):].strip().split(".")
    if len(parts) != 3:
        return None
    try:
        header = json.loads(unb64url(parts[0]))
        claims = json.loads(unb64url(parts[1]))
        signature = unb64url(parts[2])
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(header, dict) or header.get("alg") != "HS256" or not isinstance(claims, dict):
        return None
    expected = hmac.new(secret(), f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(signature, expected):
        return None
    now = time.time()
    if not isinstance(claims.get("exp"), int) or claims["exp"] < now:
        return None
    if isinstance(claims.get("nbf"), int) and claims["nbf"] > now:
        return None
    audience = claims.get("aud")
    audiences = audience if isinstance(audience, list) else [audience]
    if claims.get("iss") != ISSUER or AUDIENCE not in audiences:
        return None
    return claims


def route_of(method, path):
    """(route key, path parameters) of the route `method path` matches, or None."""
    segments = path.split("/")
    for route_method, template in ROUTES:
        if method != route_method:
            continue
        pattern = template.split("/")
        if len(pattern) != len(segments):
            continue
        params = {}
        for want, got in zip(pattern, segments):
            m = re.fullmatch(r"\{(\w+)\}", want)
            if m:
                if got == "":
                    break
                params[m.group(1)] = urllib.parse.unquote(got)
            elif want != got:
                break
        else:
            return f"{route_method} {template}", params
    return None


def request_id():
    return base64.b64encode(secrets.token_bytes(11)).decode()


class Front(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    invoke_url = None

    def log_message(self, fmt, *args):
        if os.environ.get("API_FRONT_LOG"):
            super().log_message(fmt, *args)

    def send(self, status, body, headers=None, cookies=()):
        data = body if isinstance(body, bytes) else body.encode()
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("content-type", "application/json")
        for name, value in headers.items():
            if name.lower() not in ("content-length", "connection", "transfer-encoding"):
                self.send_header(name, value)
        for cookie in cookies:
            self.send_header("set-cookie", cookie)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def handle_any(self):
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        raw_path, _, raw_query = self.path.partition("?")
        matched = route_of(self.command, raw_path)
        if matched is None:
            return self.send(404, '{"message":"Not Found"}')
        claims = claims_of(self.headers.get("authorization"))
        if claims is None:
            return self.send(401, '{"message":"Unauthorized"}')
        route_key, params = matched
        headers, cookies = {}, []
        for name, value in self.headers.items():
            name = name.lower()
            if name == "cookie":
                cookies += [c.strip() for c in value.split(";") if c.strip()]
            else:
                headers[name] = f"{headers[name]},{value}" if name in headers else value
        query = {}
        for name, value in urllib.parse.parse_qsl(raw_query, keep_blank_values=True):
            query[name] = f"{query[name]},{value}" if name in query else value
        try:
            text, encoded = body.decode("utf-8"), False
        except UnicodeDecodeError:
            text, encoded = base64.b64encode(body).decode(), True
        now = time.time()
        event = {
            "version": "2.0",
            "routeKey": route_key,
            "rawPath": raw_path,
            "rawQueryString": raw_query,
            "headers": headers,
            "requestContext": {
                "accountId": "123456789012",
                "apiId": "localapi",
                "domainName": self.headers.get("host", "localhost"),
                "domainPrefix": "localapi",
                "http": {
                    "method": self.command,
                    "path": urllib.parse.unquote(raw_path),
                    "protocol": self.request_version,
                    "sourceIp": self.client_address[0],
                    "userAgent": self.headers.get("user-agent", ""),
                },
                "requestId": request_id(),
                "routeKey": route_key,
                "stage": "$default",
                "time": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)),
                "timeEpoch": int(now * 1000),
                "authorizer": {"jwt": {"claims": {k: str(v) for k, v in claims.items()},
                                       "scopes": str(claims.get("scope", "")).split()}},
            },
            "body": text if body else None,
            "isBase64Encoded": encoded,
        }
        if cookies:
            event["cookies"] = cookies
        if query:
            event["queryStringParameters"] = query
        if params:
            event["pathParameters"] = params
        invoke = urllib.request.Request(
            f"{self.invoke_url}/2015-03-31/functions/{FUNCTION}/invocations",
            data=json.dumps(event).encode(), method="POST",
            headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(invoke, timeout=60) as answer:
                failed = answer.headers.get("x-amz-function-error")
                result = json.loads(answer.read() or b"null")
        except (urllib.error.URLError, ValueError, TimeoutError) as e:
            print(f"api-front: invoke failed: {e}", file=sys.stderr)
            return self.send(500, '{"message":"Internal Server Error"}')
        if failed:
            print(f"api-front: the function failed: {result}", file=sys.stderr)
            return self.send(500, '{"message":"Internal Server Error"}')
        if not isinstance(result, dict) or "statusCode" not in result:
            return self.send(200, json.dumps(result))
        out = result.get("body") or ""
        data = base64.b64decode(out) if result.get("isBase64Encoded") else out.encode()
        self.send(int(result["statusCode"]), data, result.get("headers") or {},
                  result.get("cookies") or [])

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = handle_any
    do_TRACE = do_CONNECT = handle_any

    def __getattr__(self, name):
        # Any other method is a route no one defined, as API Gateway answers it.
        if name.startswith("do_"):
            return self.handle_any
        raise AttributeError(name)


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--invoke-url", required=True)
    tok = sub.add_parser("token")
    tok.add_argument("tenant")
    args = parser.parse_args()
    if args.command == "token":
        print(token(args.tenant))
        return
    Front.invoke_url = args.invoke_url.rstrip("/")
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Front)
    print(f"api-front: http://127.0.0.1:{args.port} -> {args.invoke_url} ({FUNCTION})", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
