#!/usr/bin/env python3
"""Golden frames for the daemoneye-ipc wire format, computed without the crate.

Protobuf is encoded by hand here (varints, tags, packed repeated fields, proto3
presence rules) and the checksums come from zlib.crc32 (IEEE) and a table-driven
CRC-32C written below, so that a bug shared by the crate's encoder and its
checksum code cannot hide in the vectors.

Run `python3 tests/golden/gen_frames.py > tests/golden/frames.txt` after
changing this file; ci/test.sh checks that the committed output matches.
Each output line is: <name> <crc variant> <frame bytes as hex>.
"""
import struct
import zlib

# ---- checksums ------------------------------------------------------------

def _crc32c_table():
    poly = 0x82F63B78  # CRC-32C (Castagnoli) polynomial, reflected
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
        table.append(crc)
    return table

CRC32C_TABLE = _crc32c_table()

def crc32c(data):
    crc = 0xFFFFFFFF
    for byte in data:
        crc = CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF

CHECKSUMS = {"ieee": lambda data: zlib.crc32(data) & 0xFFFFFFFF, "castagnoli": crc32c}

assert CHECKSUMS["castagnoli"](b"123456789") == 0xE3069283  # the CRC-32C check value
assert CHECKSUMS["ieee"](b"123456789") == 0xCBF43926  # the CRC-32/ISO-HDLC check value

# ---- protobuf, by hand ----------------------------------------------------

def varint(n):
    if n < 0:
        n += 1 << 64  # int64 negatives are ten-byte two's complement varints
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)

def tag(field, wire_type):
    return varint(field << 3 | wire_type)

def uint(field, n):            # wire type 0
    return tag(field, 0) + varint(n)

def boolean(field, b):
    return uint(field, 1 if b else 0)

def length_delimited(field, payload):  # wire type 2
    return tag(field, 2) + varint(len(payload)) + payload

def string(field, s):
    return length_delimited(field, s.encode("utf-8"))

def double(field, x):          # wire type 1
    return tag(field, 1) + struct.pack("<d", x)

def packed_uints(field, values):
    return length_delimited(field, b"".join(varint(v) for v in values))

# Enum TaskType
ENUMERATE_PROCESSES, CHECK_PROCESS_HASH = 0, 1

# ---- the messages ---------------------------------------------------------
# proto3: implicit-presence fields at their default are not written;
# `optional` fields are written whenever set, even to the default; fields go
# out in field-number order (what prost does).

hash_task = (
    string(1, "task-0001")
    + uint(2, CHECK_PROCESS_HASH)
    + length_delimited(4,
        string(1, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        + string(2, "sha256")
        + string(3, "/usr/bin/true"))
)

filter_task = (
    string(1, "enum-7")
    # task_type ENUMERATE_PROCESSES = 0 is the default: not written
    + length_delimited(3,
        string(1, "sshd")
        + string(1, "procmond")
        + packed_uints(2, [1, 300, 70000, 4294967295])
        + string(3, "/usr/*"))
    + string(5, "m\u00e9tadonn\u00e9es \u2713")
)

long_argument = "x" * 150  # a 150-byte string: two-byte length varint

record = (
    uint(1, 4242)
    + uint(2, 1)                       # ppid
    + string(3, "procmond")
    + string(4, "/usr/sbin/procmond")
    + string(5, "procmond")
    + string(5, "--config")
    + string(5, long_argument)
    + uint(6, -1)                      # start_time: a negative int64
    + double(7, 12.5)                  # cpu_usage
    + uint(8, 1 << 40)                 # memory_usage
    + string(11, "0")                  # user_id
    + boolean(12, True)
    + boolean(13, True)
    + uint(14, 1764441600000)          # collection_time
    + boolean(17, True)                # ssdeep_degraded
)

kernel_record = (
    # pid 0 is the default: not written
    uint(2, 0)                         # ppid: optional, set to 0, so written
    + string(3, "swapper")
    # accessible, file_exists, collection_time: defaults, not written
)

result_with_records = (
    string(1, "enum-7")
    + boolean(2, True)
    + length_delimited(4, record)
    + length_delimited(4, kernel_record)
)

hash_result = (
    string(1, "h")
    # success = false: not written
    + string(3, "")                    # error_message: optional, set to "", so written
    + length_delimited(5,
        string(2, "sha256")
        + string(3, "/bin/sh")
        + string(5, "permission denied"))
)

# ---- the domains beyond processes (fields 6 to 8 of task and result) --------
# A map<string, double> entry is a nested message: key = 1, value = 2. One
# entry per map, as several would go out in HashMap order.

MONITOR_NETWORK_CONNECTIONS, COLLECT_PERFORMANCE_METRICS = 4, 6

def map_entry(field, key, value):
    return length_delimited(field, string(1, key) + double(2, value))

multi_domain_task = (
    string(1, "multi-1")
    + uint(2, COLLECT_PERFORMANCE_METRICS)
    + length_delimited(6,              # network_filter
        string(1, "tcp")
        + string(1, "udp")
        + string(2, "10.0.0.0/8")
        + string(3, "192.0.2.1:443")
        + string(4, "ESTABLISHED"))
    + length_delimited(7,              # filesystem_filter
        string(1, "/etc/**")
        + string(2, "write")
        + string(3, "conf"))
    + length_delimited(8,              # performance_filter
        string(1, "cpu_percent")
        + string(2, "procmond")
        + map_entry(3, "cpu_percent", 0.5)
        + map_entry(4, "cpu_percent", 99.5))
)

multi_domain_result = (
    string(1, "multi-1")
    + boolean(2, True)
    + length_delimited(6,              # network_events
        string(1, "conn-1")
        + string(2, "10.0.0.5:51234")
        + string(3, "192.0.2.1:443")
        + string(4, "tcp")
        + string(5, "ESTABLISHED")
        + uint(6, 4242)                # pid: optional, set
        + uint(7, 1 << 33)             # bytes_sent
        + uint(8, 17)                  # bytes_received
        + uint(9, 1764441600000))
    + length_delimited(7,              # filesystem_events
        string(1, "op-9")
        + string(2, "/etc/hosts")
        + string(3, "write")
        + uint(5, 0)                   # file_size: optional, set to 0, so written
        + string(6, "0644")
        + uint(8, 1764441600001))
    + length_delimited(8,              # performance_events
        string(1, "m-1")
        + string(2, "cpu_percent")
        + double(3, 37.25)
        + string(4, "%")
        + string(6, "procmond")
        + uint(7, -5))                 # collection_time: a negative int64
)

VECTORS = [
    ("empty_task", "ieee", b""),
    ("empty_result", "castagnoli", b""),
    ("hash_task", "ieee", hash_task),
    ("hash_task", "castagnoli", hash_task),
    ("filter_task", "ieee", filter_task),
    ("result_with_records", "castagnoli", result_with_records),
    ("result_with_records", "ieee", result_with_records),
    ("hash_result", "ieee", hash_result),
    ("multi_domain_task", "castagnoli", multi_domain_task),
    ("multi_domain_result", "castagnoli", multi_domain_result),
    ("multi_domain_result", "ieee", multi_domain_result),
]

def frame(body, variant):
    return struct.pack("<II", len(body), CHECKSUMS[variant](body)) + body

if __name__ == "__main__":
    for name, variant, body in VECTORS:
        print(name, variant, frame(body, variant).hex())
