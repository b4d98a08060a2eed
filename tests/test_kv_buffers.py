"""Host memory for KV caches (runtime/backends/base.py): a new session's first turn pays for what it writes,
not for 2 MiB pages around it."""
import mmap

import numpy as np

from belle_edge.runtime.backends.base import KeyTable, zeroed_host_buffer


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * mmap.PAGESIZE


def test_a_kv_buffer_written_sparsely_costs_only_what_is_written():
    """The ONNX Runtime backend's KV buffer for the 135M model at 8,192 slots: (layers, K/V, kv_heads x
    capacity x head_dim). A first turn writes a 55-token prefix of each of its 60 slots. On numpy's
    transparent huge pages each of those writes faulted in and zeroed a whole 2 MiB page (120 MiB here,
    236 MiB for the two ping-pong buffers, up to a second before the first token of every session)."""
    layers, kv_heads, head_dim, capacity, prefix = 30, 3, 64, 8192, 55
    buf = zeroed_host_buffer((layers, 2, kv_heads * capacity * head_dim), np.float32)
    before = _rss_bytes()
    buf[:, :, :kv_heads * prefix * head_dim] = 1.0
    grown = _rss_bytes() - before
    written = layers * 2 * kv_heads * prefix * head_dim * 4  # 2.5 MB
    assert grown < 4 * written + (8 << 20), f"{grown / 2**20:.1f} MiB resident for {written / 2**20:.1f} MiB written"
    assert buf[0, 0, kv_heads * prefix * head_dim] == 0 and buf.dtype == np.float32 and buf.flags.c_contiguous


def test_the_onnxruntime_backend_keeps_its_cache_on_such_buffers():
    from belle_edge.runtime.backends.ort_backend import OrtBackend

    backend = OrtBackend(None, num_layers=2, num_kv_heads=2, head_dim=8, vocab_size=16, kv_dtype="float32",
                         capacity=64)
    def owner(array):
        while isinstance(array, np.ndarray):
            array = array.base
        return array.obj if isinstance(array, memoryview) else array

    assert all(isinstance(owner(b), mmap.mmap) for b in backend._buffers)


def test_the_key_table_follows_appends_rollbacks_and_compaction():
    keys = KeyTable(16)
    keys.append(np.arange(6), [0, 0, 1, 1, 2, 2])
    keys.truncate(5)
    keys.append([10], [3])
    assert keys.positions.tolist() == [0, 1, 2, 3, 4, 10] and keys.turns.tolist() == [0, 0, 1, 1, 2, 3]
    keys.keep(np.array([0, 1, 4, 5]))
    assert keys.n == 4 and keys.positions.tolist() == [0, 1, 4, 10] and keys.turns.tolist() == [0, 0, 2, 3]
