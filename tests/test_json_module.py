"""The Lua `json` module (SPEC §5): encode/decode rules, errors returned as values."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from runtime import LuaErrorValue

ENCODE = """
local json = require("json")
return function(v) return json.encode(v) end
"""
ROUNDTRIP = """
local json = require("json")
return function(s)
  local v, err = json.decode(s)
  if err then return nil, err end
  return json.encode(v)
end
"""


@pytest.fixture
def encode(lua_fn):
    app = lua_fn(ENCODE)
    return lambda v: app.call("t:f", v)


@pytest.fixture
def roundtrip(lua_fn):
    app = lua_fn(ROUNDTRIP)
    return lambda s: app.call("t:f", s)


@pytest.mark.parametrize("value, expected", [
    ({"a": 1}, '{"a":1}'),
    ([1, 2, 3], "[1,2,3]"),
    (3.0, "3"),
    (3, "3"),
    (0.1, "0.1"),
    (-2.5e-8, "-2.5e-08"),
    (1e300, "1e+300"),
    ("he said \"hi\"\n", '"he said \\"hi\\"\\n"'),
    ("\x01", '"\\u0001"'),
    ("héllo", '"héllo"'),
    (True, "true"),
    (None, "null"),
    ([], "[]"),
    ({}, "[]"),  # an empty table is an array unless it came from decoding {}
    ({"b": [1, {"c": None}], "a": "x"}, '{"a":"x","b":[1,[]]}'),
])
def test_encode_rules(encode, value, expected):
    assert encode(value) == expected


def test_encode_nan_and_inf_become_null(run_lua):
    out = run_lua("""
    local json = require("json")
    return function() return json.encode({0/0, math.huge, -math.huge, 1}) end
    """)
    assert out == "[null,null,null,1]"


@pytest.mark.parametrize("lua_value, phrase", [
    ("(function() local t = {} t.self = t return t end)()", "cycle"),
    ("{1, 2, x = 3}", "mixed keys"),
    ("{[1] = 1, [3] = 3}", "sparse"),
    ("{f = function() end}", "function"),
    ("(function() local t = {} for i = 1, 200 do t = {t} end return t end)()", "deeper than 128"),
    ("{[true] = 1}", "key of type boolean"),
    ("coroutine.create(function() end)", "thread"),
])
def test_encode_refuses_with_invalid_error(run_lua, lua_value, phrase):
    result = run_lua(f"""
    local json = require("json")
    return function()
      local s, err = json.encode({lua_value})
      return s, err
    end
    """)
    s, err = result
    assert s is None
    assert isinstance(err, LuaErrorValue)
    assert err.kind == "Invalid"
    assert phrase in err.message


def test_decode_values(run_lua):
    out = run_lua("""
    local json = require("json")
    return function(s)
      local v = json.decode(s)
      return v.a, v.b[2], v.c, v.d, v.e, v.u, #v.b
    end
    """, '{"a": 1.5, "b": [true, "x\\u00e9\\ud83d\\ude00"], "c": null, "d": {}, "e": -0, "u": "\\n"}')
    assert out == (1.5, "xé😀", None, {}, 0, "\n", 2)


def test_decoded_empty_object_encodes_back_as_object(roundtrip):
    assert roundtrip('{"a": {}, "b": []}') == '{"a":{},"b":[]}'


@pytest.mark.parametrize("text, phrase", [
    ("{", "unexpected end"),
    ('{"a" 1}', "expected ':'"),
    ("[1, 2,]", "unexpected character"),
    ("01", "leading zero"),
    ('"abc', "unterminated string"),
    ('"\\q"', "invalid escape"),
    ("nul", "unexpected character"),
    ("[1] x", "unexpected text after"),
    ("", "unexpected end"),
    ('"a\tb"', "control character"),
    ("[" * 600 + "]" * 600, "nesting too deep"),
])
def test_decode_malformed_returns_invalid(roundtrip, text, phrase):
    out = roundtrip(text)
    assert isinstance(out, tuple)
    value, err = out
    assert value is None and isinstance(err, LuaErrorValue)
    assert err.kind == "Invalid" and phrase in err.message
    assert "line 1 column" in err.message


def test_decode_of_already_decoded_value_returns_it(run_lua):
    out = run_lua("""
    local json = require("json")
    return function(body)
      local t = json.decode(body)
      return t == body, json.decode(5), json.decode(true), t.id
    end
    """, {"id": 7})
    assert out == (True, 5, True, 7)


def test_decode_wrong_argument_type_raises(run_lua):
    out = run_lua("""
    local json = require("json")
    return function()
      local ok, err = pcall(json.decode, function() end)
      return ok, err
    end
    """)
    assert out[0] is False and "string expected, got function" in out[1]


def test_invalid_utf8_is_replaced_when_encoding(encode):
    assert encode(b"a\xffb") == '"a\ufffdb"'


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)


def _normalize(v):
    """What a JSON value looks like after a trip through Lua: null inside tables vanishes."""
    if isinstance(v, dict):
        return {k: _normalize(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [_normalize(x) for x in v]
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


@settings(max_examples=150, deadline=None)
@given(value=json_values)
def test_roundtrip_matches_python_json(tmp_path_factory, value):
    from conftest import lua_function_app
    app = _ROUNDTRIP_APP.get("app")
    if app is None:
        app = lua_function_app(tmp_path_factory.mktemp("rt"), ROUNDTRIP)
        _ROUNDTRIP_APP["app"] = app
    # Arrays holding null have holes in Lua (covered by the sparse-array rule).
    assume(not _null_in_list(value))
    out = app.call("t:f", json.dumps(value))
    back = json.loads(out)
    expected = _normalize(value)
    if isinstance(expected, float) and math.isclose(expected, back):
        return
    assert _normalize(back) == expected or _loose_equal(_normalize(back), expected)


def _null_in_list(v):
    if isinstance(v, list):
        return any(x is None or _null_in_list(x) for x in v)
    if isinstance(v, dict):
        return any(_null_in_list(x) for x in v.values())
    return False


def _loose_equal(a, b):
    # Empty dicts and lists are the same Lua table unless decoded from {}.
    if isinstance(a, (dict, list)) and isinstance(b, (dict, list)) and not a and not b:
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_loose_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_loose_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


_ROUNDTRIP_APP: dict = {}


# -- the decoder's two scanning paths: compiled (JIT on) and interpreted (a state with a
# time limit runs with the JIT off); both must read every number and string the same way.
DECODE_BOTH = """
namespace: t
entries:
  - {name: fast, kind: function.lua, source: file://d.lua, modules: [json]}
  - {name: interpreted, kind: function.lua, source: file://d.lua, modules: [json], timeout: 10s}
"""
DECODE_LUA = """
local json = require("json")
return function(s)
  local v, err = json.decode(s)
  if err then return "error: " .. err:message() end
  if type(v) == "number" then return string.format("%.17g", v) end
  return v
end
"""


def _both_paths(tmp_path_factory, name, files):
    """A started app whose t:fast and t:interpreted run the same Lua, JIT on and off; a call
    of both."""
    from conftest import write_app

    from runtime import App
    root = tmp_path_factory.mktemp(name)
    write_app(root, files)
    app = App.load(root)
    app.start()
    return app, lambda s: (app.call("t:fast", s), app.call("t:interpreted", s))


@pytest.fixture(scope="module")
def decode_both(tmp_path_factory):
    app, both = _both_paths(tmp_path_factory, "decode", {"app.yaml": DECODE_BOTH, "d.lua": DECODE_LUA})
    yield both
    app.stop()


@pytest.mark.parametrize("text", [
    "0", "-0", "7", "12345", "-12345", "123456789012345", "1234567890123456", "9007199254740993",
    "-9007199254740993", "1.5", "-1.5e3", "1E2", "1e+2", "2e-3", "0.000001", "-0.0", "0e0", "10.25E-2",
    "99999999999999999999",
])
def test_decode_numbers_like_python_on_both_paths(decode_both, text):
    expected = float(text)  # Lua numbers are doubles: "-0" is -0.0, as tonumber reads it
    for got in decode_both(text):
        assert float(got) == expected and math.copysign(1, float(got)) == math.copysign(1, expected), (text, got)


@pytest.mark.parametrize("text, phrase", [
    ("01", "leading zero"), ("-01", "leading zero"), ("1.", "malformed number"), ("1e", "malformed number"),
    ("1.e3", "malformed number"), ("-", "unexpected"), ("--1", "unexpected"), ("1.5e+", "malformed number"),
    ("[1,]", "unexpected"), ("+1", "unexpected"), ('"abc', "unterminated string"), ('"a\x01b"', "control character"),
    ('"a\\qb"', "invalid escape"),
])
def test_decode_refuses_malformed_text_alike_on_both_paths(decode_both, text, phrase):
    fast, interpreted = decode_both(text)
    assert fast == interpreted and fast.startswith("error:") and phrase in fast, (fast, interpreted)


@pytest.mark.parametrize("text", ['"plain"', '""', '"tab\\tand \\"quote\\" \\u00e9 \\ud83d\\ude00"', '"h\u00e9llo"',
                                  '"' + "x" * 5000 + '"', '{"k":"v","n":[1,"two",{"x":1.5}]}'])
def test_decode_strings_alike_on_both_paths(decode_both, text):
    fast, interpreted = decode_both(text)
    assert fast == interpreted == json.loads(text)


ENCODE_BOTH = """
namespace: t
entries:
  - {name: mem, kind: queue.driver.memory, lifecycle: {auto_start: true}}
  - {name: sink, kind: queue.queue, driver: mem, driver_options: {memory: {max_length: 100000}}}
  - {name: fast, kind: function.lua, source: file://e.lua, modules: [json, queue]}
  - {name: interpreted, kind: function.lua, source: file://e.lua, modules: [json, queue], timeout: 10s}
"""
# json.encode, and the strict encoding queue.publish applies to a body (to a queue nobody reads).
ENCODE_LUA = """
local json = require("json")
local queue = require("queue")
return function(s)
  local lenient = json.encode({ k = s, [s] = 1 })
  local ok, err = queue.publish("t:sink", { k = s, [s] = 1 })
  return lenient, ok and "sent" or ("error: " .. err:message())
end
"""


@pytest.fixture(scope="module")
def encode_both(tmp_path_factory):
    app, both = _both_paths(tmp_path_factory, "encode", {"app.yaml": ENCODE_BOTH, "e.lua": ENCODE_LUA})
    yield both
    app.stop()


@pytest.mark.parametrize("s", ["plain", "", "with space", "quote\"", "back\\slash", "tab\t", "nul\x00", "del\x7f",
                               "h\u00e9llo", "\u4e2d\u6587", "\U0001f600", "x" * 3000])
def test_encode_strings_alike_on_both_paths(encode_both, s):
    fast, interpreted = encode_both(s)
    assert fast == interpreted
    lenient, strict = fast
    assert json.loads(lenient) == {"k": s, s: 1} and strict == "sent"


def test_encode_refuses_invalid_utf8_strictly_and_replaces_it_leniently_on_both_paths(encode_both):
    fast, interpreted = encode_both(b"bad \xff byte")
    assert fast == interpreted
    lenient, strict = fast
    assert "\ufffd" in json.loads(lenient)["k"] and strict.startswith("error:") and "UTF-8" in strict
