"""Device-resident TensorSet and the seeded, resumable BatchStream."""
import io

import numpy as np
import pytest
import torch

from imbssl.data.device_loader import BatchStream, TensorSet


def make_set(n=10, c=1, h=2, w=2):
    """Images whose pixels all equal their index (mod 256), labels = index % 3."""
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, c, h, w)
    return TensorSet(images.contiguous(), torch.arange(n) % 3)


def test_tensorset_checks_and_from_numpy():
    with pytest.raises(ValueError, match="uint8"):
        TensorSet(torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64"):
        TensorSet(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))
    hwc = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    ts = TensorSet.from_numpy(hwc, None)
    assert ts.images.shape == (2, 3, 3, 4) and ts.labels.tolist() == [-1, -1]
    assert torch.equal(ts.images[1, 2], torch.from_numpy(hwc[1, :, :, 2]))
    assert len(ts) == 2 and ts.device.type == "cpu"


@pytest.mark.parametrize(("n", "batch"), [(10, 5), (10, 3), (7, 7), (3, 8)])
def test_every_index_once_per_epoch(n, batch):
    stream = BatchStream(make_set(n), batch, seed=0)
    num_batches = 2 * n // np.gcd(n, batch)  # covers exactly 2 * lcm(n, batch) items
    seen = []
    for _ in range(num_batches):
        images, labels, idx = stream.next()
        assert images.shape == (batch, 1, 2, 2) and labels.shape == idx.shape == (batch,)
        assert torch.equal(images[:, 0, 0, 0].long(), idx) and torch.equal(labels, idx % 3)
        seen.append(idx)
    seen = torch.cat(seen).view(-1, n)  # consecutive epochs
    for epoch in seen:
        assert sorted(epoch.tolist()) == list(range(n))
    assert not all(torch.equal(seen[0], e) for e in seen[1:])  # reshuffled every epoch


def test_state_dict_roundtrip_continues_identically():
    stream = BatchStream(make_set(13), 5, seed=42)
    for _ in range(3):  # mid-epoch (position 2 of the second epoch)
        stream.next()
    state = stream.state_dict()
    expected = [stream.next()[2] for _ in range(8)]
    buf = io.BytesIO()  # as in a checkpoint: torch.save, then torch.load(weights_only=True)
    torch.save(state, buf)
    buf.seek(0)
    resumed = BatchStream(make_set(13), 5, seed=999)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    got = [resumed.next()[2] for _ in range(8)]
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert resumed.epoch == stream.epoch and resumed.position == stream.position


def test_state_dict_is_a_snapshot_and_checks_size():
    stream = BatchStream(make_set(6), 4, seed=1)
    state = stream.state_dict()
    stream.next()
    stream.next()  # crosses an epoch: the saved permutation must not change
    fresh = BatchStream(make_set(6), 4, seed=1)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.next()[2], BatchStream(make_set(6), 4, seed=1).next()[2])
    with pytest.raises(ValueError, match="permutation covers 6"):
        BatchStream(make_set(7), 4, seed=1).load_state_dict(state)


def test_seeds_are_independent_and_reproducible():
    a = [BatchStream(make_set(50), 10, seed=0).next()[2] for _ in range(2)]
    b = BatchStream(make_set(50), 10, seed=1).next()[2]
    assert torch.equal(a[0], a[1]) and not torch.equal(a[0], b)
    # Two streams with different seeds interleaved do not disturb each other.
    s0, s1 = BatchStream(make_set(50), 10, seed=0), BatchStream(make_set(50), 10, seed=1)
    s1.next()
    assert torch.equal(s0.next()[2], a[0])
    torch.manual_seed(123)  # the global RNG is not used
    assert torch.equal(BatchStream(make_set(50), 10, seed=0).next()[2], a[0])


def test_iteration_and_errors():
    stream = BatchStream(make_set(4), 3, seed=0)
    assert len(stream) == 2 and iter(stream) is stream
    assert next(stream)[2].shape == (3,)
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(make_set(4), 0, seed=0)
    with pytest.raises(ValueError, match="empty"):
        BatchStream(make_set(0), 2, seed=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_stream_matches_cpu():
    cpu = BatchStream(make_set(20), 6, seed=3)
    gpu = BatchStream(make_set(20), 6, seed=3, device="cuda")
    for _ in range(5):
        (xc, yc, ic), (xg, yg, ig) = cpu.next(), gpu.next()
        assert xg.is_cuda and torch.equal(ic, ig.cpu()) and torch.equal(xc, xg.cpu())
        assert torch.equal(yc, yg.cpu())
