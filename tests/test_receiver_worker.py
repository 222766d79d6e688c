"""The decode worker with the real ReceiverCodec of a tiny model package and real SenderCodec bitstreams:
batching by size, recorded timings, stored PNG and thumbnail, permanent versus retried failures."""

from __future__ import annotations

import hashlib
import io
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import receiver_support
from aeic.receiver.registry import CodecRegistry
from aeic.receiver.storage import FilesystemBlobStore, NewImage, SqlMetadataStore, Status
from aeic.receiver.storage.blobs import bitstream_key, reconstruction_key, thumbnail_key
from aeic.receiver.worker import DecodeWorker, WorkerConfig
from aeic.shared.bitstream import Bitstream, pack, unpack
from PIL import Image

pytest.importorskip("aeic.codec.testing", reason="aeic.codec.testing (tiny model package) not available")

from aeic.receiver.decoder import ReceiverCodec
from aeic.sender.encoder import SenderCodec

# Fixtures shared with the other receiver tests.
tiny_package = receiver_support.tiny_package


class Rig:
    """Storage plus a worker around the real codec."""

    def __init__(self, root: Path, codec: ReceiverCodec, batch_size: int = 4) -> None:
        self.store = SqlMetadataStore.from_url(f"sqlite:///{root / 'receiver.db'}")
        self.store.migrate()
        self.blobs = FilesystemBlobStore(root / "blobs")
        self.worker = DecodeWorker(self.store, self.blobs, CodecRegistry.from_codecs([codec]),
                                   WorkerConfig(batch_size=batch_size, max_attempts=3, retry_delay_s=0.0))

    def add(self, data: bytes) -> str:
        header = unpack(data).header
        image_id = secrets.token_hex(16)
        self.blobs.put(bitstream_key(image_id), data)
        self.store.insert_image(NewImage(
            id=image_id, device="cam", idempotency_key=None, model_id=header.model_id.hex(), width=header.width,
            height=header.height, rate_index=header.rate_index, bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest()))
        return image_id

    def drain(self) -> None:
        while self.worker.run_once():
            pass


@pytest.fixture(scope="module")
def codecs(tiny_package: Path) -> tuple[SenderCodec, ReceiverCodec]:
    return SenderCodec.from_package(tiny_package), ReceiverCodec.from_package(tiny_package, device="cpu")


def test_worker_batches_and_stores_real_reconstructions(codecs: tuple[SenderCodec, ReceiverCodec],
                                                        tmp_path: Path) -> None:
    sender, receiver = codecs
    photos = [receiver_support.natural_photo(96, 64, s) for s in (1, 2, 3)] + [
        receiver_support.natural_photo(48, 80, 4)]
    streams = [sender.encode(p, level) for p, level in zip(photos, (0, 1, 0, 1))]
    rig = Rig(tmp_path, receiver, batch_size=3)
    ids = [rig.add(s) for s in streams]
    rig.drain()
    for image_id, stream, photo in zip(ids, streams, photos):
        record = rig.store.get_image(image_id)
        assert record is not None and record.status is Status.DONE, record
        assert record.batch_size == (3 if photo.shape == (64, 96, 3) else 1)
        assert record.entropy_ms is not None and record.entropy_ms > 0
        assert record.decoder_ms is not None and record.decoder_ms > 0
        assert record.decode_ms is not None and record.decode_ms >= record.entropy_ms
        stored = np.asarray(Image.open(io.BytesIO(rig.blobs.get(reconstruction_key(image_id)))).convert("RGB"))
        single = receiver.decode(stream)
        assert stored.shape == single.shape == photo.shape
        assert np.abs(stored.astype(int) - single.astype(int)).mean() < 1.0
        with Image.open(io.BytesIO(rig.blobs.get(thumbnail_key(image_id)))) as thumb:
            assert thumb.format == "JPEG" and max(thumb.size) <= 320


def test_undecodable_stream_fails_at_once_and_does_not_block_its_batch(
        codecs: tuple[SenderCodec, ReceiverCodec], tmp_path: Path) -> None:
    sender, receiver = codecs
    good = sender.encode(receiver_support.natural_photo(96, 64, 7), 0)
    parsed = unpack(good)
    header = parsed.header.__class__(parsed.header.model_id, parsed.header.width, parsed.header.height,
                                     200, parsed.header.colour_stats, parsed.header.half_precision)
    bad = pack(Bitstream(header, parsed.payload))  # valid container, rate level the model does not have
    rig = Rig(tmp_path, receiver)
    good_id, bad_id = rig.add(good), rig.add(bad)
    rig.drain()
    good_record, bad_record = rig.store.get_image(good_id), rig.store.get_image(bad_id)
    assert good_record is not None and good_record.status is Status.DONE
    assert bad_record is not None and bad_record.status is Status.FAILED
    assert bad_record.attempts == 1 and "rate level 200" in (bad_record.error or "")


def test_corrupt_payload_fails_at_once_and_does_not_block_its_batch(
        codecs: tuple[SenderCodec, ReceiverCodec], tmp_path: Path) -> None:
    """A valid container whose entropy-coded payload is garbage cannot decode on any retry: one attempt only."""
    sender, receiver = codecs
    good = sender.encode(receiver_support.natural_photo(96, 64, 8), 0)
    parsed = unpack(good)
    garbage = bytes(np.random.default_rng(0).integers(0, 256, len(parsed.payload), dtype=np.uint8))
    bad = pack(Bitstream(parsed.header, garbage))  # CRC valid, payload not a stream of this model
    rig = Rig(tmp_path, receiver)
    good_id, bad_id = rig.add(good), rig.add(bad)
    rig.drain()
    good_record, bad_record = rig.store.get_image(good_id), rig.store.get_image(bad_id)
    assert good_record is not None and good_record.status is Status.DONE
    assert bad_record is not None and bad_record.status is Status.FAILED, bad_record
    assert bad_record.attempts == 1 and "EntropyDecodeError" in (bad_record.error or "")


def test_a_bad_stream_of_a_batch_costs_the_good_ones_no_second_entropy_decode(
        codecs: tuple[SenderCodec, ReceiverCodec], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A corrupt payload last in a batch failed the whole batch after the good images were entropy-decoded;
    the worker then decoded every image again one by one (8 entropy decodes for 4 streams, the good images
    synthesised singly). Now each stream is entropy-decoded once and the good ones stay one batch."""
    sender, receiver = codecs
    goods = [sender.encode(receiver_support.natural_photo(96, 64, s), 0) for s in (11, 12, 13)]
    parsed = unpack(goods[0])
    garbage = bytes(np.random.default_rng(1).integers(0, 256, len(parsed.payload), dtype=np.uint8))
    rig = Rig(tmp_path, receiver)
    ids = [rig.add(s) for s in [*goods, pack(Bitstream(parsed.header, garbage))]]
    entropy_decoded: list[bytes] = []  # the payloads the entropy decoder read, one per call
    latent = receiver._latent

    def counted(item: Any) -> Any:
        entropy_decoded.append(item.payload)
        return latent(item)

    monkeypatch.setattr(receiver, "_latent", counted)
    rig.drain()
    records = [rig.store.get_image(image_id) for image_id in ids]
    assert all(r is not None and r.status is Status.DONE and r.batch_size == 4 for r in records[:3]), records
    bad = records[3]
    assert bad is not None and bad.status is Status.FAILED and bad.attempts == 1, bad
    assert "EntropyDecodeError" in (bad.error or "")
    assert len(entropy_decoded) == 4


def test_a_failed_synthesis_pass_is_retried_image_by_image_from_its_latents(
        codecs: tuple[SenderCodec, ReceiverCodec], monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass over several images that fails (the device out of memory, say) is rendered again one image at a
    time, with no second entropy decode: each image comes back as it decodes alone."""
    sender, receiver = codecs
    streams = [sender.encode(receiver_support.natural_photo(96, 64, s), 0) for s in (21, 22)]
    alone = [receiver.decode(s) for s in streams]
    synthesise, latent = receiver._synthesise, receiver._latent
    passes: list[int] = []
    entropy_decodes: list[int] = []

    def fails_when_batched(members: list[int], *rest: Any) -> None:
        passes.append(len(members))
        if len(members) > 1:
            raise RuntimeError("CUDA out of memory")
        synthesise(members, *rest)

    def counted(item: Any) -> Any:
        entropy_decodes.append(1)
        return latent(item)

    monkeypatch.setattr(receiver, "_synthesise", fails_when_batched)
    monkeypatch.setattr(receiver, "_latent", counted)
    outcomes = receiver.decode_each(streams)
    assert passes == [2, 1, 1] and len(entropy_decodes) == 2
    for outcome, expected in zip(outcomes, alone):
        assert isinstance(outcome, np.ndarray) and np.array_equal(outcome, expected)
