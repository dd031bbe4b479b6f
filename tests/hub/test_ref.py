"""Adapter names and references: what is accepted, and what is refused before any path is built."""

import pytest

from hub.errors import InvalidReferenceError
from hub.ref import AdapterRef, validate_name, validate_repo_id


@pytest.mark.parametrize("name", ["sentiment", "team-a/sentiment", "ner_v2", "a.b-c_d", "x1"])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "", "..", "../etc/passwd", "../../etc/passwd", "/abs", "abs/", "a//b", "a/b/c", "Upper",
        "a b", "bad\x00nul", "tab\tname", "%2e%2e", "a/..", "./a", "-lead", "a/123", "x" * 97,
        "a\nb", "ns/.hidden",
    ],
)  # fmt: skip
def test_invalid_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidReferenceError) as info:
        validate_name(name)
    assert "lowercase" in str(info.value) or "name" in str(info.value)


def test_parse_forms() -> None:
    assert AdapterRef.parse("sent") == AdapterRef("sent")
    assert AdapterRef.parse("sent@3") == AdapterRef("sent", version=3)
    assert AdapterRef.parse("sent@v3") == AdapterRef("sent", version=3)
    assert AdapterRef.parse("ns/sent@prod") == AdapterRef("ns/sent", tag="prod")
    assert str(AdapterRef.parse("ns/sent@prod")) == "ns/sent@prod"
    assert AdapterRef("a", version=2).is_pinned and not AdapterRef("a").is_pinned


@pytest.mark.parametrize("text", ["sent@", "sent@@1", "sent@1@2", "sent@0", "sent@Prod", "@1", "sent@-1"])
def test_parse_refuses_malformed(text: str) -> None:
    with pytest.raises(InvalidReferenceError):
        AdapterRef.parse(text)


def test_error_is_also_a_value_error() -> None:
    with pytest.raises(ValueError):
        AdapterRef.parse("../x")


@pytest.mark.parametrize("repo_id", ["acme/x", "a1/b-2.c_3", "Org/Name", "acme/" + "x" * 96])
def test_good_hub_repo_ids(repo_id: str) -> None:
    assert validate_repo_id(repo_id) == repo_id


@pytest.mark.parametrize(
    "repo_id",
    [
        "",
        "x",
        "a/b/c",
        "acme/..",
        "acme/a..b",
        "acme/a--b",
        "/x",
        "acme/-x",
        "acme/x-",
        "a\nb/x",
        "a/" + "x" * 97,
    ],
)
def test_bad_hub_repo_ids_are_refused_with_the_rule(repo_id: str) -> None:
    """One rule for the client (hub.remote) and the service (hub.service.names adds reserved namespaces)."""
    with pytest.raises(InvalidReferenceError) as info:
        validate_repo_id(repo_id)
    assert "NAMESPACE/NAME" in info.value.remedy


@pytest.mark.parametrize(
    "text",
    ["x@prod\n", "x@prod\r", "x@\tprod", "acme/tags.json", "tags.json", "acme/readme.md", "manifest.json@1"],
)
def test_registry_file_names_and_control_characters_in_tags_are_refused(text: str) -> None:
    """Issue 20: `$` in a pattern also matches before a final newline; names of the registry's own files."""
    with pytest.raises(InvalidReferenceError):
        AdapterRef.parse(text)
