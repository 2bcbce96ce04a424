#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpus from the golden frames.

    ci/fuzz-seeds.py OUTPUT_DIR

Each target reads its input as a little program (see src/fuzzing.rs); the
seeds wrap every golden frame (tests/golden/frames.txt) in the shape each
target expects, so the fuzzers start from real traffic rather than noise.
"""
import os
import struct
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..")
out = sys.argv[1]

frames = []
with open(os.path.join(ROOT, "tests", "golden", "frames.txt")) as golden:
    for line in golden:
        name, variant, hexbytes = line.split()
        frames.append((name, variant, bytes.fromhex(hexbytes)))


def settings(variant, default_limit=True):
    """The harnesses' settings byte: bit 0 the CRC, bit 1 the default limit."""
    return bytes([(1 if variant == "castagnoli" else 0) | (2 if default_limit else 0)])


def write(target, name, data):
    directory = os.path.join(out, target)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, name), "wb") as seed:
        seed.write(data)


for name, variant, frame in frames:
    # frame_stream: one large chunk (selector 224, u16 length), then the end.
    write("frame_stream", name, settings(variant) + bytes([224]) + struct.pack("<H", len(frame)) + frame + b"\0")
    # typed_messages: settings, the message type, then the body.
    kind = b"\1" if "result" in name else b"\0"
    write("typed_messages", name, settings(variant) + kind + frame[8:])
    if len(frame) <= 255:
        # server_policy: limits, then raw bytes (event 1) of the frame, then
        # every kind of event once.
        limits = bytes([4]) + settings(variant, default_limit=False) + bytes([50, 50, 50]) + struct.pack("<H", 65535)
        events = bytes([1, len(frame)]) + frame + bytes([2, 0, 2, 3, 255, 255, 4, 60, 5, 6])
        write("server_policy", name, limits + events)
        # client_policy: limits, a task, the frame as bytes from the server.
        write("client_policy", name, bytes([4]) + settings(variant, default_limit=False) + bytes([50, 0, 1, 3, len(frame)]) + frame)

write(
    "config_loader",
    "readme_example",
    b"\0"
    + b"""[ipc]
transport = "interprocess"
endpoint_path = "/run/daemoneye/procmond.sock"
max_frame_bytes = 1048576
accept_timeout_ms = 5000
read_timeout_ms = 30000
write_timeout_ms = 10000
task_timeout_ms = 30000
max_connections = 16
crc32_variant = "ieee"
socket_group = ""
""",
)
write("config_loader", "env_only", b"\2\0\4/tmp\6\4\x05ieee")
