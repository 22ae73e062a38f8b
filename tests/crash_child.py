"""Child for the crash test: stores deterministic chunks until it is killed."""

import sys

from gds_kvcache import CacheEngineConfig, LocalDiskBackend, SlabMemoryAllocator
from gds_kvcache.units import GB, MiB

from tests.reliability_common import chunk_data, rkey


def main() -> None:
    directory, start, cap_mib, engine = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    cfg = CacheEngineConfig(local_disk=directory, max_local_disk_size=cap_mib * MiB / GB, io_engine=engine,
                            io_threads=4, io_task_size=64 * 1024)
    alloc = SlabMemoryAllocator(32 * MiB, "host")
    be = LocalDiskBackend(cfg, None, alloc)
    print("ready", flush=True)
    pending = []
    for i in range(start, start + 400):
        data = chunk_data(i)
        o = alloc.allocate(data.shape, data.dtype)
        o.tensor.copy_(data)
        f = be.submit_put_task(rkey(i), o)
        o.ref_count_down()
        pending.append((i, f))
        while len(pending) > 4:
            j, fj = pending.pop(0)
            fj.result()
            print(f"commit {j} ok", flush=True)
    for j, fj in pending:
        fj.result()
        print(f"commit {j} ok", flush=True)
    print("done", flush=True)
    sys.stdin.read()  # wait to be killed


if __name__ == "__main__":
    main()
