"""The resolver: refs -> immutable versions, never paths, base/kind/task checks, hub only when configured."""

from __future__ import annotations

import sys
import types

import pytest

from hub.errors import (
    AdapterNotFoundError,
    BaseMismatchError,
    ChecksumMismatchError,
    InvalidReferenceError,
)
from hub.store import LocalStore
from server.errors import FullModelError, HubNotConfiguredError, WrongTaskError
from server.resolver import CLASSIFY, GENERATE, NER, SCORE, Resolver
from tests.server.fakes import FAKE_BASE, OTHER_FINGERPRINT, populate, register


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> LocalStore:
    """Populated once for the read-only tests."""
    store = LocalStore(tmp_path_factory.mktemp("resolver") / "registry")
    populate(store)
    return store


@pytest.fixture
def store(registry: LocalStore) -> LocalStore:
    """Populated per test, for tests that change the registry."""
    populate(registry)
    return registry


@pytest.fixture
def resolver(shared_store: LocalStore) -> Resolver:
    return Resolver(shared_store, FAKE_BASE)


def test_refs_resolve_to_immutable_versions(resolver: Resolver):
    assert resolver.resolve("chat").key == "chat@2"
    assert resolver.resolve("chat@1").key == "chat@1"
    assert resolver.resolve("chat@prod").key == "chat@1"
    resolved = resolver.resolve("chat", endpoint=GENERATE)
    assert resolved.manifest.ref == "chat@2" and resolved.path.name == "2"


def test_latest_moves_on_every_call(store: LocalStore):
    resolver = Resolver(store, FAKE_BASE)
    assert resolver.resolve("chat").key == "chat@2"
    register(store, "chat")
    assert resolver.resolve("chat").key == "chat@3"
    store.tag("chat@3", "prod")
    assert resolver.resolve("chat@prod").key == "chat@3"


@pytest.mark.parametrize(
    "text",
    ["/etc/passwd", "../chat", "./chat", "chat/../../x", "~/adapters/chat", "C:\\chat", "s3://b/chat", ""],
)
def test_paths_and_malformed_refs_are_refused(resolver: Resolver, text: str):
    with pytest.raises(InvalidReferenceError):
        resolver.resolve(text)


def test_unknown_adapter_is_404_with_a_remedy(resolver: Resolver):
    with pytest.raises(AdapterNotFoundError, match="no remote hub is configured"):
        resolver.resolve("nope")
    with pytest.raises(AdapterNotFoundError, match="no version 9"):
        resolver.resolve("chat@9")


def test_other_base_is_refused_with_how_to_serve_it(resolver: Resolver):
    with pytest.raises(BaseMismatchError, match=r"--base tiny") as err:
        resolver.resolve("foreign")
    assert OTHER_FINGERPRINT[:19] in str(err.value)


def test_full_model_is_refused_with_the_base_flag(resolver: Resolver):
    with pytest.raises(FullModelError, match=r"--base registry:merged@1"):
        resolver.resolve("merged")


@pytest.mark.parametrize(
    ("name", "endpoint", "right"),
    [
        ("sentiment", GENERATE, "/v1/classify"),
        ("people", CLASSIFY, "/v1/ner"),
        ("judge", NER, "/v1/score"),
        ("chat", SCORE, "/v1/chat/completions"),
    ],
)
def test_wrong_task_names_the_right_endpoint(resolver: Resolver, name: str, endpoint: str, right: str):
    with pytest.raises(WrongTaskError, match=right):
        resolver.resolve(name, endpoint=endpoint)


def test_any_task_without_an_endpoint(resolver: Resolver):
    assert resolver.resolve("people").manifest.task == "ner"


def test_verify_catches_changed_files(store: LocalStore):
    resolver = Resolver(store, FAKE_BASE)
    resolved = resolver.resolve("other")
    resolver.verify(resolved)
    (resolved.path / "adapter_model.safetensors").write_bytes(b"tampered")
    with pytest.raises(ChecksumMismatchError, match="adapter_model.safetensors"):
        resolver.verify(resolved)


def test_hub_source_needs_a_configured_hub(resolver: Resolver):
    with pytest.raises(HubNotConfiguredError, match="--hub"):
        resolver.resolve("chat", source="hub")


class FakeHubClient:
    """Stands in for hub.remote.HubClient: 'pulls' by registering a fake adapter locally."""

    pulls: list[tuple] = []

    def __init__(self, endpoint: str, token: str | None) -> None:
        self.endpoint, self.token = endpoint, token

    def pull(self, repo_id, revision, store, as_name=None, expected_base=None):
        FakeHubClient.pulls.append((repo_id, revision, as_name, expected_base))
        if repo_id == "acme/missing":
            raise AdapterNotFoundError(f"{repo_id} is not on the hub.")
        return register(store, as_name or repo_id)


def test_a_local_miss_pulls_from_the_configured_hub(store: LocalStore, monkeypatch):
    module = types.ModuleType("hub.remote")
    module.HubClient = FakeHubClient
    monkeypatch.setitem(sys.modules, "hub.remote", module)
    FakeHubClient.pulls = []
    resolver = Resolver(store, FAKE_BASE, hub_endpoint="http://127.0.0.1:1", hub_token="t")
    assert resolver.resolve("acme/chat@prod", endpoint=GENERATE).key == "acme/chat@1"
    assert FakeHubClient.pulls == [("acme/chat", "prod", "acme/chat", FAKE_BASE.spec)]
    assert resolver.resolve("acme/chat@prod").key == "acme/chat@1"  # now a local hit: no second pull
    assert resolver.resolve("acme/chat@2").key == "acme/chat@2"  # hub versions are its vN tags
    assert FakeHubClient.pulls[-1][:2] == ("acme/chat", "v2")
    assert resolver.resolve("chat").key == "chat@2"  # local hits never touch the hub
    with pytest.raises(AdapterNotFoundError):
        resolver.resolve("acme/missing")
    with pytest.raises(AdapterNotFoundError, match="NAMESPACE/NAME"):
        resolver.resolve("bare-name")  # hub repos are namespaced: nothing is fetched
    with pytest.raises(AdapterNotFoundError):
        resolver.resolve("acme/elsewhere", source="local")
    assert [p[0] for p in FakeHubClient.pulls] == ["acme/chat", "acme/chat", "acme/missing"]
