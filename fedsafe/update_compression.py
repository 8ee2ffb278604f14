"""`compress-updates`: a node's upload in 8 bits per value, deflated, for thin hospital links.

What is compressed is the node's *already-noised* update: the arrays DP-SGD produced, which the node's
ledger has already paid for. Quantising and deflating them is post-processing of the DP output, so it
costs no ε and changes no privacy figure; it only changes how many bytes travel and, within half a
quantisation step per value, what the coordinator aggregates.

Encoding (the node, in its privacy gate, client/gate.py): for every floating-point array, its difference
from the global model the node was sent, d = w − g (small and centred, unlike w), is rounded to the
nearest of 256 evenly spaced levels from min(d) to max(d). The one-byte codes of all arrays, in the order
`QUANTISATION` lists them, are deflated (zlib) into one Array of stype `STYPE` under `CODES` (one stream:
Flower's per-array framing, ~200 bytes an array, would otherwise eat much of the saving on a small
model); `QUANTISATION`, a ConfigRecord, holds the arrays' names and each one's offset and step. Other
arrays (integer buffers) travel as they are.

Decoding (the coordinator, server/loop.py, before any validation): g + offset + code·step, with the
global model the coordinator itself sent. Anything that does not decode to exactly the global model's
arrays — a wrong stype, dtype or length, an unknown or repeated name, a missing or non-finite offset or
step, a deflate stream of the wrong length (or one that would inflate past it) — raises CompressionError
naming the problem; the coordinator rejects that update like any invalid one (a strike).

SecAgg+ quantises the masked update itself (secagg-clipping-range); the two are not combined (the run
configuration refuses it, and so does a node asked for both).

The node and the coordinator both use this module; it imports only fedsafe.protocol.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedsafe.protocol import QUANTISATION

STYPE = "fedsafe.q8-deflate"  # one Array of every compressed array's uint8 codes, deflated
CODES = "(q8-codes)"  # its key in the reply's arrays (parentheses: no PyTorch parameter is named so)
CODE_DTYPE = "uint8"
LEVELS = 255  # steps between the lowest and the highest level (256 levels)
NAMES, OFFSETS, STEPS = "arrays", "offsets", "steps"  # the QUANTISATION record's keys


class CompressionError(ValueError):
    """A compressed update that cannot be decoded; the message names the array and what is wrong."""


def _is_float(value: np.ndarray) -> bool:
    return np.issubdtype(value.dtype, np.floating)


def quantise(difference: np.ndarray) -> tuple[np.ndarray, float, float]:
    """`difference` (float64) as one-byte codes and the (offset, step) that decode them: the nearest of
    256 levels from its min to its max. A non-finite difference gives NaN offset and step (the
    coordinator rejects them), never an exception on the node."""
    low, high = (float(difference.min()), float(difference.max())) if difference.size else (0.0, 0.0)
    if not (np.isfinite(low) and np.isfinite(high)):
        return np.zeros(difference.shape, np.uint8), float("nan"), float("nan")
    step = (high - low) / LEVELS
    if step == 0.0:
        return np.zeros(difference.shape, np.uint8), low, 0.0
    codes = np.clip(np.rint((difference - low) / step), 0, LEVELS).astype(np.uint8)
    return codes, low, step


def encode(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> tuple[ArrayRecord, ConfigRecord]:
    """The node's side: `update` (its trained arrays) relative to `reference` (the global model it was sent)
    as (the arrays to send, their QUANTISATION record)."""
    plain, names, offsets, steps, codes = {}, [], [], [], []
    for key, value in update.items():
        value = np.asarray(value)
        if not _is_float(value) or key not in reference or np.shape(reference[key]) != value.shape:
            plain[key] = Array.from_numpy_ndarray(value)  # sent as it is; the coordinator's checks apply
            continue
        code, offset, step = quantise(value.astype(np.float64) - np.asarray(reference[key], dtype=np.float64))
        names.append(key)
        offsets.append(offset)
        steps.append(step)
        codes.append(code.ravel())
    joined = np.concatenate(codes) if codes else np.zeros(0, np.uint8)
    plain[CODES] = Array(dtype=CODE_DTYPE, shape=(int(joined.size),), stype=STYPE, data=zlib.compress(joined.tobytes(), 9))
    return ArrayRecord(plain), ConfigRecord({NAMES: names, OFFSETS: offsets, STEPS: steps})


def _inflate(array: Array, size: int) -> np.ndarray:
    """The codes in `array`, exactly `size` of them; a stream that would inflate past that is cut off
    there (a few bytes must not become gigabytes on the coordinator)."""
    if array.stype != STYPE or array.dtype != CODE_DTYPE or tuple(array.shape) != (size,):
        raise CompressionError(f"'{CODES}' must be {CODE_DTYPE} codes of shape ({size},) and stype {STYPE!r}; got "
                               f"{array.dtype} {tuple(array.shape)} {array.stype!r}")
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(array.data, size + 1)
    except zlib.error as err:
        raise CompressionError(f"'{CODES}' is not a deflate stream ({err})") from None
    if len(raw) != size or inflater.unconsumed_tail or not inflater.eof:
        raise CompressionError(f"'{CODES}' does not inflate to {size} codes")
    return np.frombuffer(raw, dtype=np.uint8)


def _ranges(ranges: ConfigRecord, arrays: ArrayRecord, reference: ArrayRecord) -> list[tuple[str, float, float]]:
    """(name, offset, step) of each compressed array, checked against the global model."""
    names, offsets, steps = (ranges.get(key) for key in (NAMES, OFFSETS, STEPS))
    if sorted(ranges.keys()) != sorted((NAMES, OFFSETS, STEPS)) or not all(
            isinstance(v, list) for v in (names, offsets, steps)) or not len(names) == len(offsets) == len(steps):
        raise CompressionError(f"'{QUANTISATION}' must hold three lists of one length: {NAMES}, {OFFSETS}, {STEPS}")
    if len(set(names)) != len(names) or not all(isinstance(n, str) for n in names):
        raise CompressionError(f"'{QUANTISATION}' names an array twice")
    for name, offset, step in zip(names, offsets, steps):
        if name not in reference or name in arrays.keys() or not _is_float(reference[name].numpy()):
            raise CompressionError(f"'{QUANTISATION}' names {name!r}, not a floating-point array of the model "
                                   f"(or one also sent uncompressed)")
        if not (isinstance(offset, float) and isinstance(step, float) and np.isfinite(offset) and np.isfinite(step)
                and step >= 0):
            raise CompressionError(f"array {name!r}: offset {offset!r} and step {step!r} must be finite, step >= 0")
    return list(zip(names, offsets, steps))


def decode(arrays: ArrayRecord, ranges: ConfigRecord, reference: ArrayRecord) -> ArrayRecord:
    """The coordinator's side: the update the node meant, from its compressed `arrays` and `ranges` and
    the global model `reference` the coordinator sent; CompressionError names the first malformed part."""
    if CODES not in arrays.keys():
        raise CompressionError(f"compress-updates is on, but the reply has no '{CODES}'")
    decoded = {}
    for key in arrays.keys():  # arrays sent as they are: integer buffers only
        if key == CODES:
            continue
        if key not in reference:
            raise CompressionError(f"unexpected array {key!r}")
        if _is_float(reference[key].numpy()):
            raise CompressionError(f"compress-updates is on, but floating-point array {key!r} is not compressed")
        decoded[key] = arrays[key]
    listed = _ranges(ranges, arrays, reference)
    bases = [reference[name].numpy() for name, _, _ in listed]
    codes = _inflate(arrays[CODES], sum(int(b.size) for b in bases))
    position = 0
    for (name, offset, step), base in zip(listed, bases):
        code = codes[position:position + base.size].reshape(base.shape)
        position += base.size
        decoded[name] = Array.from_numpy_ndarray((base.astype(np.float64) + offset + code * step).astype(base.dtype))
    return ArrayRecord(decoded)


def dequantised(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the coordinator gets from `update` after encoding and decoding: each value moved by at most
    half a quantisation step."""
    arrays, ranges = encode(update, reference)
    record = ArrayRecord({k: Array.from_numpy_ndarray(np.asarray(v)) for k, v in reference.items()})
    decoded = decode(arrays, ranges, record)
    return {k: decoded[k].numpy() for k in decoded.keys()}
