"""Queue codecs (SPEC §2): `json/plain` (default) and `application/msgpack`.

Every driver path goes through the codec, the memory driver included, so a message that
works in tests works with a broker. Lua encodes bodies itself, in the queue's codec
(lua_modules/json.lua and msgpack.lua); `from_lua` turns what it hands over into bytes.
"""

from __future__ import annotations

import json
import json.encoder
import threading
from typing import Any

import msgpack

from ..errors import InvalidMessage


class Codec:
    name = ""

    def encode(self, value: Any) -> bytes:
        """Encode a Python value (from the CLI or App.publish)."""
        raise NotImplementedError

    def from_lua(self, text: str) -> bytes:
        """The body as Lua encoded it for this codec (queue.publish), as bytes."""
        raise NotImplementedError

    def decode(self, body: bytes) -> Any:
        """Decode to a Python value. Raises ValueError when the body cannot be decoded."""
        raise NotImplementedError


def _not_json(o: Any) -> Any:
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


class JsonCodec(Codec):
    name = "json/plain"

    def __init__(self) -> None:
        # One C encoder per thread, made once: json.dumps with options builds an encoder per call,
        # which is half its cost for a small body. Its `markers` (the cycle check) belong to one
        # thread, and are cleared after a failure so a half-done encode leaves none behind.
        self._local = threading.local()

    def _encoder(self) -> tuple[Any, dict[int, Any]]:
        markers: dict[int, Any] = {}
        try:
            make: Any = getattr(json.encoder, "c_make_encoder", None)
            pair = (make(markers, _not_json, json.encoder.encode_basestring, None, ":", ",", False, False, False),
                    markers)
        except TypeError:  # pragma: no cover - no C accelerator, or another signature
            enc = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
            pair = (lambda v, _level: (enc.encode(v),), markers)
        self._local.encoder = pair
        return pair

    def encode(self, value: Any) -> bytes:
        try:
            encode, markers = self._local.encoder
        except AttributeError:
            encode, markers = self._encoder()
        try:
            if isinstance(value, str):
                return json.encoder.encode_basestring(value).encode()
            return "".join(encode(value, 0)).encode()
        except (TypeError, ValueError, RecursionError) as exc:
            markers.clear()
            raise InvalidMessage(f"body cannot be encoded as JSON: {exc}") from None

    def from_lua(self, text: str) -> bytes:
        return text.encode("utf-8")

    def decode(self, body: bytes) -> Any:
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"body is not valid JSON: {exc}") from None
        except RecursionError:
            raise ValueError("body is not valid JSON: nested too deeply") from None


class MsgpackCodec(Codec):
    name = "application/msgpack"

    def encode(self, value: Any) -> bytes:
        try:
            return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise InvalidMessage(f"body cannot be encoded as msgpack: {exc}") from None

    def from_lua(self, text: str) -> bytes:
        # msgpack.lua's transport form: each byte as the code point of the same number.
        try:
            return text.encode("latin-1")
        except UnicodeEncodeError:
            raise InvalidMessage("msgpack body from Lua is not in transport form") from None

    def decode(self, body: bytes) -> Any:
        try:
            return msgpack.unpackb(body, raw=False, strict_map_key=False)
        except Exception as exc:  # msgpack raises several unrelated types
            raise ValueError(f"body is not valid msgpack: {exc}") from None


CODECS: dict[str, Codec] = {"json/plain": JsonCodec(), "application/msgpack": MsgpackCodec()}


def get_codec(name: str) -> Codec:
    return CODECS[name]
