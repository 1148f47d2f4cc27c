"""The teacher-output cache on disk: a manifest, one record per complete epoch, and shards.

``DIR/manifest.json``
    the format, the identity of the stream and teacher (:mod:`deitctl.cache_identity`) and
    the layout (:class:`Layout`): written once, atomically; a later ``teach`` adds epochs
    only when its recipe has the same identity.
``DIR/epoch-NNNN.json``
    epoch NNNN (1-based, as the logs count) is complete: its shards with their size and
    sha256. Written atomically after the epoch's last shard; epochs taught elsewhere combine
    by copying these files and their shards into one folder.
``DIR/epoch-NNNN/rank-RR.step-SSSSSS.safetensors``
    ``shard_steps`` consecutive steps of process ``RR``'s stream from step ``SSSSSS``: the
    teacher's logits of each step's batch (``logits`` [steps, batch, classes] in fp32, or
    ``argmax`` and the ``top_k`` largest ``values`` (fp16) and their ``indices``), and the
    ``checksum`` of each step's teacher input (:func:`input_checksum`). Written atomically.

Nothing is pickled. A shard's bytes are checked against the epoch record's sha256 when read.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deitctl.checkpoint import atomic_write
from deitctl.errors import UserError

FORMAT = "deitctl-teacher-cache-1"
MANIFEST = "manifest.json"
CHECKSUM_RTOL = 1e-6
"""Allowed difference of an input checksum, relative to its scale: far above the rounding of
fp32 storage and reduction order, far below what another image, crop, flip or Mixup makes."""
FILL_BELOW_MAX = 1e4
"""Top-k storage with ``tail_tau = 0``: the logits not stored are rebuilt as the row's maximum
minus this, so that softmax(logits / τ) gives them probability 0 (softmax over the top k, as
FKD; exp underflows in fp32 for τ below about 80)."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Layout:
    """What the shards hold and how the stream is cut into them."""

    num_classes: int
    storage: str
    """``"full"``: every logit in fp32; ``"topk"``: the argmax and the ``top_k`` largest logits (fp16)."""
    top_k: int
    tail_tau: float
    """Top-k storage: the logits not stored are rebuilt as one value per image, the one that
    gives them their true total probability at this temperature (0: probability 0)."""
    logits_dtype: str
    """The dtype the teacher returned (its precision); cached logits are given back in it."""
    batch_size: int
    world_size: int
    steps_per_epoch: int
    shard_steps: int

    @property
    def shards_per_rank(self) -> int:
        return -(-self.steps_per_epoch // self.shard_steps)

    def shard_name(self, epoch: int, rank: int, start: int) -> str:
        return f"epoch-{epoch + 1:04d}/rank-{rank:02d}.step-{start:06d}.safetensors"

    def shard_starts(self) -> range:
        return range(0, self.steps_per_epoch, self.shard_steps)


def epoch_record_name(epoch: int) -> str:
    return f"epoch-{epoch + 1:04d}.json"


# --------------------------------------------------------------------------- files


def write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file ({what})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a readable {what} ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a {what}")
    return data


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(cache: Path) -> tuple[dict[str, Any], Layout]:
    """The manifest and its layout; a missing or foreign one is a clear error."""
    if not cache.is_dir():
        raise UserError(f"{cache}: no such teacher cache (make one with `deitctl teach RECIPE --cache {cache}`)")
    manifest = read_json(cache / MANIFEST, "teacher-cache manifest")
    if manifest.get("format") != FORMAT:
        raise UserError(f"{cache / MANIFEST}: not a deitctl teacher cache (format {manifest.get('format')!r})")
    try:
        layout = Layout(**manifest["layout"])
    except (KeyError, TypeError) as exc:
        raise UserError(f"{cache / MANIFEST}: a broken layout ({exc})") from None
    return manifest, layout


def cache_precision(cache: Path) -> str:
    """The precision the cached logits were computed at (``run.precision`` resolved)."""
    manifest, _ = read_manifest(cache)
    return str(manifest.get("identity", {}).get("run.precision", ""))


def cached_epochs(cache: Path, layout: Layout) -> dict[int, dict[str, Any]]:
    """The complete epochs (0-based) whose shards are all there with their recorded size;
    an epoch record whose shards are missing or truncated is left out (a partial copy)."""
    out: dict[int, dict[str, Any]] = {}
    for path in sorted(cache.glob("epoch-*.json")):
        record = read_json(path, "teacher-cache epoch record")
        epoch = int(record.get("epoch", 0)) - 1
        shards = record.get("shards", [])
        expected = layout.world_size * layout.shards_per_rank
        if epoch < 0 or len(shards) != expected:
            continue
        if all(_size(cache / s["file"]) == s["bytes"] for s in shards):
            out[epoch] = record
    return out


def incomplete_epochs(cache: Path, layout: Layout) -> dict[int, str]:
    """Epoch records (0-based) whose shards are missing or of another size: what is wrong."""
    out: dict[int, str] = {}
    for path in sorted(cache.glob("epoch-*.json")):
        record = read_json(path, "teacher-cache epoch record")
        for s in record.get("shards", []):
            size = _size(cache / s["file"])
            if size != s["bytes"]:
                what = "missing" if size is None else f"{size} bytes, recorded {s['bytes']}"
                out[int(record["epoch"]) - 1] = f"{cache / s['file']} is {what}"
                break
    return out


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


# --------------------------------------------------------------------------- shards


def encode(logits: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """[steps, batch, classes] logits as the layout stores them (on the CPU)."""
    logits = logits.detach().float().cpu()
    if layout.storage == "full":
        return {"logits": logits.contiguous()}
    index_dtype = torch.int16 if layout.num_classes <= 2**15 else torch.int32
    out = {"argmax": logits.argmax(dim=-1).to(index_dtype)}
    if layout.top_k == 0:  # hard targets only
        return out
    values, indices = logits.topk(layout.top_k, dim=-1)
    out.update(values=values.clamp(-65000, 65000).half(), indices=indices.to(index_dtype))
    rest = layout.num_classes - layout.top_k
    if layout.tail_tau > 0 and rest > 0:
        # the value v with rest·exp(v/τ) = Σ exp(z/τ) over the logits not stored
        tail = logits.scatter(-1, indices, float("-inf")) / layout.tail_tau
        fill = layout.tail_tau * (tail.logsumexp(dim=-1) - math.log(rest))
        out["fill"] = fill.clamp(-65000, 65000).half()
    return out


def decode(tensors: dict[str, torch.Tensor], layout: Layout) -> torch.Tensor:
    """[steps, batch, classes] fp32 logits back from a shard: exact for ``full``; for ``topk``
    the stored logits, the others at the stored fill value (their total probability at
    ``tail_tau``) or at ``max - FILL_BELOW_MAX`` (none), and the stored argmax kept as the
    argmax even where fp16 rounding made a tie; with ``top_k = 0`` (the argmax alone) 0, and
    ``FILL_BELOW_MAX`` at the argmax: a one-hot softmax."""
    if layout.storage == "full":
        return tensors["logits"].float()
    if layout.top_k == 0:
        argmax = tensors["argmax"].long().unsqueeze(-1)
        one_hot = torch.zeros(*argmax.shape[:-1], layout.num_classes)
        return one_hot.scatter_(-1, argmax, FILL_BELOW_MAX)
    values, indices = tensors["values"].float(), tensors["indices"].long()
    top = values.max(dim=-1, keepdim=True).values
    low = values.min(dim=-1, keepdim=True).values
    fill = tensors["fill"].float().unsqueeze(-1).minimum(low) if "fill" in tensors else top - FILL_BELOW_MAX
    out = fill.expand(*values.shape[:-1], layout.num_classes).clone()
    out.scatter_(-1, indices, values)
    argmax = tensors["argmax"].long()
    wrong = out.argmax(dim=-1) != argmax
    if wrong.any():  # a tie in fp16: lift the true argmax by one fp32 step
        at = out.gather(-1, argmax.unsqueeze(-1))
        lifted = torch.nextafter(top, torch.full_like(top, float("inf")))
        out.scatter_(-1, argmax.unsqueeze(-1), torch.where(wrong.unsqueeze(-1), lifted, at))
    return out


def shard_bytes(logits: torch.Tensor, checksums: torch.Tensor, layout: Layout) -> bytes:
    """A shard's file: the same bytes for the same outputs (one metadata key, so no map order)."""
    from safetensors.torch import save

    tensors = encode(logits, layout)
    tensors["checksum"] = checksums.float().cpu().contiguous()
    return bytes(save(tensors, metadata={"format": FORMAT}))


def load_shard(path: Path, sha256: str) -> dict[str, torch.Tensor]:
    """A shard's tensors, its bytes checked against the epoch record."""
    from safetensors.torch import load

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read this teacher-cache shard ({exc.strerror or exc})") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise UserError(
            f"{path}: corrupt teacher-cache shard (its sha256 differs from the one recorded when it was "
            "written); delete it and its epoch record (epoch-NNNN.json) and run `deitctl teach` again"
        )
    try:
        (n,) = struct.unpack("<Q", data[:8])
        json.loads(data[8 : 8 + n])
        return dict(load(data))
    except Exception as exc:
        raise UserError(f"{path}: not a readable teacher-cache shard ({exc})") from None


# --------------------------------------------------------------------------- the teacher's input


def input_checksum(images: torch.Tensor) -> torch.Tensor:
    """Four numbers (fp64) that tell one batch of teacher input from another: the sum, the
    sum of squares, the sum weighted by position in the batch (the order of the images) and
    by column (a flip or shift of an image)."""
    x = images.detach()
    per_image = x.sum(dim=(1, 2, 3), dtype=torch.float64)
    columns = x.sum(dim=(0, 1, 2), dtype=torch.float64)
    w_image = torch.arange(1, x.shape[0] + 1, dtype=torch.float64, device=x.device)
    w_column = torch.arange(1, x.shape[-1] + 1, dtype=torch.float64, device=x.device)
    squares = torch.linalg.vector_norm(x, dtype=torch.float64).square()
    return torch.stack([per_image.sum(), squares, (per_image * w_image).sum(), (columns * w_column).sum()])


def checksums_match(stored: torch.Tensor, now: torch.Tensor, shape: torch.Size) -> bool:
    """``now`` (this step's :func:`input_checksum`) equals ``stored`` within fp32 rounding."""
    stored, now = stored.double().cpu(), now.double().cpu()
    squares = now[1].clamp(min=0)
    scale = (shape.numel() * squares).sqrt()  # >= sum |x|
    bounds = torch.stack([scale, squares, scale * shape[0], scale * shape[-1]]) * CHECKSUM_RTOL + 1e-12
    return bool(((stored - now).abs() <= bounds).all())


# --------------------------------------------------------------------------- reading


class CacheReader:
    """One process's cached teacher outputs, read a shard at a time."""

    def __init__(self, cache: Path, layout: Layout, epochs: dict[int, dict[str, Any]], rank: int) -> None:
        self.cache, self.layout, self.rank = cache, layout, rank
        self.sha = {e: {s["file"]: s["sha256"] for s in record["shards"]} for e, record in epochs.items()}
        self.dtype = DTYPES[layout.logits_dtype]
        self._key: tuple[int, int] | None = None
        self._shard: dict[str, torch.Tensor] = {}

    def has(self, epoch: int) -> bool:
        return epoch in self.sha

    def batch(self, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input checksum, logits [batch, classes] in the teacher's dtype) of one step."""
        start = step - step % self.layout.shard_steps
        if self._key != (epoch, start):
            name = self.layout.shard_name(epoch, self.rank, start)
            self._shard, self._key = load_shard(self.cache / name, self.sha[epoch][name]), (epoch, start)
        i = step - start
        one = {k: v[i : i + 1] for k, v in self._shard.items() if k != "checksum"}
        return self._shard["checksum"][i], decode(one, self.layout)[0].to(self.dtype)
