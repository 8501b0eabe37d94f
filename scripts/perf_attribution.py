#!/usr/bin/env python3
"""Splits a `perf script` of the client benchmark by who the CPU was spent for.

Reads `perf script` output on stdin (call graphs, leaf first). Samples of the `sns-stand-in`
thread (the bus stand-in) are counted apart and left out of the shares. Every other sample goes
to the first frame, walking from the leaf towards the root, whose crate is an owner:
  * the dispatcher's own code (`pg_outbox`, the toolkit's library, and its tracing);
  * the AWS SDK and its HTTP stack (aws-*, smithy, hyper, http, tower, rustls);
  * the PostgreSQL client (tokio-postgres and its protocol and types crates).
Frames of generic code (std, core, alloc, serde, serde_json, tokio, libc, the kernel, ...) are
walked past, so a memcpy or a JSON writer called by the envelope counts as the dispatcher's.
A sample with no owner on its stack is the runtime's (tokio's scheduler and IO driver, syscalls
made from it). Prints the shares and the top leaf functions.
"""

import collections
import re
import sys

OWNERS = [
    ("dispatcher (its own code)", ("pg_outbox", "outbox_dispatcher")),
    ("dispatcher (tracing)", ("tracing", "tracing_core", "tracing_subscriber")),
    ("AWS SDK and HTTP stack", ("aws_", "hyper", "http", "h2", "tower", "rustls", "ring",
                                "webpki", "aws_smithy")),
    ("PostgreSQL client", ("tokio_postgres", "postgres_protocol", "postgres_types")),
]

CRATE = re.compile(r"^<*(?:&(?:mut )?)?(?:dyn )?([A-Za-z_][A-Za-z0-9_]*)::")


def crate_of(symbol):
    m = CRATE.match(symbol)
    return m.group(1) if m else ""


def owner_of(frames):
    """(category, the frame that decided it)."""
    for symbol in frames:
        crate = crate_of(symbol)
        if not crate:
            continue
        for name, prefixes in OWNERS:
            if any(crate == p or (p.endswith("_") and crate.startswith(p)) or crate.startswith(p + "_")
                   for p in prefixes):
                return name, symbol
    return "runtime (tokio scheduler, IO driver, syscalls from it)", None


def samples(lines):
    header, frames = None, []
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            if header is not None:
                yield header, frames
            header, frames = None, []
        elif not line.startswith((" ", "\t")):
            header = line
        else:
            parts = line.strip().split(" ", 1)
            if len(parts) == 2:
                symbol = re.sub(r"\+0x[0-9a-f]+ \(.*\)$| \(.*\)$", "", parts[1])
                frames.append(symbol)
    if header is not None:
        yield header, frames


def main():
    shares = collections.Counter()
    leaves = collections.Counter()
    own_frames = collections.Counter()
    own_self = collections.Counter()
    stand_in = total = 0
    for header, frames in samples(sys.stdin):
        if header.lstrip().startswith("sns-stand-in"):
            stand_in += 1
            continue
        total += 1
        owner, frame = owner_of(frames)
        shares[owner] += 1
        if owner.startswith("dispatcher"):
            own_self[frame] += 1
        if frames:
            leaves[frames[0]] += 1
        # The dispatcher's own code: the innermost of its functions on the stack.
        for symbol in frames:
            if crate_of(symbol) == "pg_outbox":
                own_frames[symbol] += 1
                break
    print(f"samples: {total} of the dispatcher process, {stand_in} of the SNS stand-in (left out)\n")
    print("| CPU spent for | share |")
    print("|---|---|")
    for name, n in shares.most_common():
        print(f"| {name} | {100 * n / max(total, 1):.1f} % |")
    print("\n| top functions (self) | share |")
    print("|---|---|")
    for symbol, n in leaves.most_common(15):
        print(f"| `{symbol[:110]}` | {100 * n / max(total, 1):.1f} % |")
    print("\n| where the dispatcher's own share goes (its function, with the generic code it calls) | share |")
    print("|---|---|")
    for symbol, n in own_self.most_common(12):
        print(f"| `{symbol[:110]}` | {100 * n / max(total, 1):.1f} % |")
    print("\n| the dispatcher's own functions (innermost on the stack, SDK and client calls included) | share |")
    print("|---|---|")
    for symbol, n in own_frames.most_common(12):
        print(f"| `{symbol[:110]}` | {100 * n / max(total, 1):.1f} % |")


if __name__ == "__main__":
    main()
