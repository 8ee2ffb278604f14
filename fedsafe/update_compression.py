"""`compress-updates`: a node's upload in 8 bits per value, deflated, for thin hospital links.

What is compressed is the node's *already-noised* update: the arrays DP-SGD produced, which the node's
ledger has already paid for. Quantising and deflating them is post-processing of the DP output, so it
costs no ε and changes no privacy figure; it only changes how many bytes travel and, within half a
quantisation step per value, what the coordinator aggregates.

Encoding (the node, in its privacy gate, client/gate.py): for every floating-point array the node
uploads, its difference from the global model the node was sent, d = w − g (small and centred, unlike w),
is rounded to the nearest of 256 evenly spaced levels from min(d) to max(d). One deflate (zlib) stream
holds every such array's (offset, step) as float64, then every array's one-byte codes, in the global
model's order, in one Array of stype `STYPE` under `CODES`: one stream and no record beside it, because
Flower frames every record and array with ~150–450 bytes, which on a small model eats much of the saving.
Other arrays (integer buffers) travel as they are.

Decoding (the coordinator, server/loop.py, before any validation): g + offset + code·step, with the
global model the coordinator itself sent, for its floating-point arrays that are not frozen (frozen ones
are never uploaded). Anything that does not decode to exactly those arrays — a wrong stype, dtype or
length, a stream that is not deflate or inflates to the wrong size (it is cut off past the right one: a
few bytes must not become gigabytes), a non-finite offset or step, a negative step, a float array sent
uncompressed — raises CompressionError naming the problem; the coordinator rejects that update like
any invalid one (a strike).

SecAgg+ quantises the masked update itself (secagg-clipping-range); the two are not combined (the run
configuration refuses it, and so does a node asked for both).

The node and the coordinator both use this module; it imports nothing of fedsafe's.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

STYPE = "fedsafe.q8-deflate"  # (offset, step) of every compressed array, then their uint8 codes, deflated
CODES = "(q8-codes)"  # its key in the reply's arrays (parentheses: no PyTorch parameter is named so)
CODE_DTYPE = "uint8"  # the Array's dtype; its shape: (number of codes,)
RANGE_DTYPE = np.dtype("<f8")  # each array's offset and step, at the head of the stream
LEVELS = 255  # steps between the lowest and the highest level (256 levels)


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


def compressed_names(reference: Mapping[str, np.ndarray], uploaded) -> list[str]:
    """The arrays one stream holds: the global model's floating-point arrays among those `uploaded`, in
    the global model's order (the node and the coordinator derive the same list: nothing names them)."""
    uploaded = set(uploaded)
    return [k for k in reference if k in uploaded and _is_float(np.asarray(reference[k]))]


def encode(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> ArrayRecord:
    """The node's side: `update` (its trained arrays) relative to `reference` (the global model it was sent)
    as the arrays to send."""
    names = compressed_names(reference, [k for k, v in update.items() if _is_float(np.asarray(v))])
    plain = {k: Array.from_numpy_ndarray(np.asarray(v)) for k, v in update.items() if k not in names}
    ranges, codes = [], []
    for key in names:
        code, offset, step = quantise(np.asarray(update[key], np.float64) - np.asarray(reference[key], np.float64))
        ranges += [offset, step]
        codes.append(code.ravel())
    joined = np.concatenate(codes) if codes else np.zeros(0, np.uint8)
    stream = np.array(ranges, RANGE_DTYPE).tobytes() + joined.tobytes()
    plain[CODES] = Array(dtype=CODE_DTYPE, shape=(int(joined.size),), stype=STYPE, data=zlib.compress(stream, 9))
    return ArrayRecord(plain)


def _inflate(array: Array, count: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The (offset, step) pairs of `count` arrays and their `size` codes from `array`; a stream that
    would inflate past that is cut off there."""
    if array.stype != STYPE or array.dtype != CODE_DTYPE or tuple(array.shape) != (size,):
        raise CompressionError(f"'{CODES}' must be {CODE_DTYPE} codes of shape ({size},) and stype {STYPE!r}; got "
                               f"{array.dtype} {tuple(array.shape)} {array.stype!r}")
    head = count * 2 * RANGE_DTYPE.itemsize
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(array.data, head + size + 1)
    except zlib.error as err:
        raise CompressionError(f"'{CODES}' is not a deflate stream ({err})") from None
    if len(raw) != head + size or inflater.unconsumed_tail or not inflater.eof:
        raise CompressionError(f"'{CODES}' does not inflate to {count} (offset, step) pairs and {size} codes")
    return np.frombuffer(raw[:head], RANGE_DTYPE).reshape(count, 2), np.frombuffer(raw[head:], np.uint8)


def decode(arrays: ArrayRecord, reference: ArrayRecord, frozen=()) -> ArrayRecord:
    """The coordinator's side: the update the node meant, from its compressed `arrays` and the global model
    `reference` the coordinator sent (less the `frozen` arrays nodes never upload); CompressionError names
    the first malformed part."""
    if CODES not in arrays.keys():
        raise CompressionError(f"compress-updates is on, but the reply has no '{CODES}'")
    frozen = set(frozen)
    bases = {k: reference[k].numpy() for k in reference.keys() if k not in frozen}
    names = compressed_names(bases, bases)
    decoded = {}
    for key in arrays.keys():  # arrays sent as they are: integer buffers only
        if key == CODES:
            continue
        if key in names:
            raise CompressionError(f"compress-updates is on, but floating-point array {key!r} is not compressed")
        decoded[key] = arrays[key]  # validated with the rest of the update
    ranges, codes = _inflate(arrays[CODES], len(names), sum(int(bases[k].size) for k in names))
    position = 0
    for key, (offset, step) in zip(names, ranges):
        if not (np.isfinite(offset) and np.isfinite(step)) or step < 0:
            raise CompressionError(f"array {key!r}: offset {offset!r} and step {step!r} must be finite, step >= 0")
        base = bases[key]
        code = codes[position:position + base.size].reshape(base.shape)
        position += base.size
        decoded[key] = Array.from_numpy_ndarray((base.astype(np.float64) + offset + code * step).astype(base.dtype))
    return ArrayRecord(decoded)

