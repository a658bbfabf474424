"""The keyword table of JSON schemas (:mod:`eft_local.schema`): what the grammar enforces,
what is checked on the finished reply (:mod:`eft_local.schema_check`), what is an
annotation, and what is neither; and the checks themselves."""

from __future__ import annotations

import pytest

from eft_local import schema
from eft_local.errors import EftError
from eft_local.schema_check import CHECKED, FORMATS, needs_check, violations


def test_the_keyword_table_is_the_documented_one() -> None:
    assert {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"} <= schema.ENFORCED
    assert {"multipleOf", "uniqueItems", "minProperties", "maxProperties"} == CHECKED
    assert set(FORMATS) == {"email", "hostname", "ipv4", "ipv6", "uri"}
    assert {"discriminator", "title", "description"} <= schema.ANNOTATIONS
    assert not CHECKED & schema.ENFORCED


@pytest.mark.parametrize(("node", "strict", "note"), [
    ({"type": "integer", "minimum": 0, "maximum": 3000}, None, None),
    ({"type": "integer", "multipleOf": 5}, "'multipleOf' at schema.properties.x", None),
    ({"type": "string", "format": "email"}, "'format' 'email' at schema.properties.x", None),
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True},
     "'uniqueItems' at schema.properties.x", None),
    ({"type": "string", "format": "idn-email"}, "'format' 'idn-email' at schema.properties.x",
     "'format' 'idn-email' at schema.properties.x"),
    ({"type": "integer", "not": {"const": 3}}, "'not' at schema.properties.x",
     "'not' at schema.properties.x"),
    ({"oneOf": [{"type": "integer"}], "discriminator": {"propertyName": "k"}}, None, None),
])
def test_each_keyword_is_enforced_checked_or_neither(node: dict, strict: str | None,
                                                     note: str | None) -> None:
    whole = {"type": "object", "properties": {"x": node}, "required": ["x"]}
    assert schema.unenforced(whole) == strict and schema.unchecked(whole) == note
    seen: list[str] = []
    schema.schema_grammar(whole, note=seen.append)
    assert seen == ([f"the JSON schema uses {note}, which constrained decoding can neither "
                     "enforce nor check: the reply may not follow it"] if note else [])
    if strict:
        with pytest.raises(EftError, match=f"strict but uses {strict}"):
            schema.schema_grammar(whole, strict=True)
    else:
        schema.schema_grammar(whole, strict=True)


SHOP = {"type": "object", "$defs": {"Item": {"type": "object", "properties": {
    "qty": {"type": "integer", "multipleOf": 6}, "mail": {"type": "string", "format": "email"}},
    "maxProperties": 2}}, "properties": {
    "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "uniqueItems": True},
    "host": {"anyOf": [{"type": "string", "format": "ipv4"}, {"type": "string",
                                                               "format": "hostname"},
                       {"type": "null"}]},
    "price": {"type": "number", "multipleOf": 0.01}, "meta": {"minProperties": 1}}}


@pytest.mark.parametrize(("reply", "found"), [
    ('{"items": [{"qty": 12, "mail": "a@b.c"}], "host": "10.0.0.1", "price": 1.25, '
     '"meta": {"a": 1}}', []),
    ('{"items": [{"qty": 7}]}', ["'multipleOf' at #/$defs/Item.properties.qty: "
                                 "reply.items[0].qty is 7, not a multiple of 6"]),
    ('{"items": [{"qty": 6}, {"qty": 6}]}', ["'uniqueItems' at schema.properties.items: "
                                             'reply.items is [{"qty": 6}, {"qty": 6}], with '
                                             '{"qty": 6} twice']),
    ('{"items": [{"mail": "nobody"}]}', ["'format' at #/$defs/Item.properties.mail: "
                                         'reply.items[0].mail is "nobody", not an email']),
    ('{"items": [{"qty": 6, "mail": "a@b", "x": 1}]}',
     ['\'maxProperties\' at #/$defs/Item: reply.items[0] is {"qty": 6, "mail": "a@b", '
      '"x": 1}, with more than 2 properties']),
    ('{"host": "example.org"}', []),  # the hostname branch fits
    ('{"host": "bad host!"}', ["'format' at schema.properties.host.anyOf[0]: reply.host is "
                               '"bad host!", not an ipv4']),
    ('{"host": null, "price": 1.005}', ["'multipleOf' at schema.properties.price: "
                                        "reply.price is 1.005, not a multiple of 0.01"]),
    ('{"meta": {}}', ["'minProperties' at schema.properties.meta: reply.meta is {}, with "
                      "fewer than 1 properties"]),
    ('{"items": [', []),  # cut short: its finish says so
])
def test_a_finished_reply_is_checked_where_the_grammar_could_not(reply: str,
                                                                 found: list[str]) -> None:
    assert needs_check(SHOP)
    assert violations(SHOP, reply) == found


def test_a_schema_without_such_keywords_is_not_checked() -> None:
    assert not needs_check({"type": "object", "properties": {"n": {"type": "integer",
                                                                   "minimum": 3}}})
