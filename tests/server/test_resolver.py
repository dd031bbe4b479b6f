"""The resolver: refs -> immutable versions, never paths, base/kind/task checks, hub only when configured."""

from __future__ import annotations

import pytest

from hub.errors import (
    AdapterNotFoundError,
    BaseMismatchError,
    ChecksumMismatchError,
    HubError,
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


HUB = "http://127.0.0.1:1"


class FakeHubClient:
    """Stands in for hub.remote.HubClient: 'pulls' by registering a fake adapter locally.

    `commits` maps (repo, revision) to the commit it points at; a pull by commit records it.
    """

    pulls: list[tuple] = []
    commits: dict[tuple[str, str | None], str] = {}
    lookups: list[tuple] = []
    down = False

    def __init__(self, endpoint: str, token: str | None) -> None:
        self.endpoint, self.token = endpoint, token

    def revision_commit(self, repo_id, revision=None):
        FakeHubClient.lookups.append((repo_id, revision))
        if FakeHubClient.down:
            raise HubError("Cannot reach the hub at http://127.0.0.1:1.")
        if repo_id == "acme/missing":
            raise AdapterNotFoundError(f"{repo_id} is not on the hub.")
        return FakeHubClient.commits.get((repo_id, revision), f"c-{revision}")

    def pull(self, repo_id, revision, store, as_name=None, expected_base=None, keep_version=False):
        FakeHubClient.pulls.append((repo_id, revision, as_name, expected_base))
        return register(store, as_name or repo_id)


@pytest.fixture
def fake_hub() -> type[FakeHubClient]:
    FakeHubClient.pulls, FakeHubClient.lookups, FakeHubClient.commits = [], [], {}
    FakeHubClient.down = False
    return FakeHubClient


def test_a_local_miss_pulls_from_the_configured_hub(store: LocalStore, fake_hub):
    resolver = Resolver(store, FAKE_BASE, hub=fake_hub(HUB, "t"))
    assert resolver.resolve("acme/chat@prod", endpoint=GENERATE).key == "acme/chat@1"
    # a tag is pulled at the commit it names now
    assert fake_hub.pulls == [("acme/chat", "c-prod", "acme/chat", FAKE_BASE.spec)]
    assert resolver.resolve("acme/chat@prod").key == "acme/chat@1"  # now a local hit: no second pull
    assert resolver.resolve("acme/chat@2").key == "acme/chat@2"  # hub versions are its vN tags
    assert fake_hub.pulls[-1][:2] == ("acme/chat", "v2")
    assert resolver.resolve("chat").key == "chat@2"  # local hits never touch the hub
    with pytest.raises(AdapterNotFoundError):
        resolver.resolve("acme/missing")
    with pytest.raises(AdapterNotFoundError, match="NAMESPACE/NAME"):
        resolver.resolve("bare-name")  # hub repos are namespaced: nothing is fetched
    with pytest.raises(AdapterNotFoundError):
        resolver.resolve("acme/elsewhere", source="local")
    assert [p[0] for p in fake_hub.pulls] == ["acme/chat", "acme/chat"]


def test_a_tag_moved_on_the_hub_is_pulled_again(store: LocalStore, fake_hub, caplog):
    resolver = Resolver(store, FAKE_BASE, hub=fake_hub(HUB, None), hub_refresh_s=0)
    fake_hub.commits[("acme/chat", "prod")] = "aaa"
    assert resolver.resolve("acme/chat@prod").key == "acme/chat@1"
    assert resolver.resolve("acme/chat@prod").key == "acme/chat@1"  # asked again, not moved: no pull
    assert len(fake_hub.pulls) == 1 and len(fake_hub.lookups) == 2
    fake_hub.commits[("acme/chat", "prod")] = "bbb"
    assert resolver.resolve("acme/chat@prod").key == "acme/chat@2"
    assert fake_hub.pulls[-1][:2] == ("acme/chat", "bbb") and store.tags("acme/chat")["prod"] == 2
    assert resolver.resolve("acme/chat@1").key == "acme/chat@1"  # versions never move: no lookup
    assert resolver.resolve("acme/chat@prod", source="local").key == "acme/chat@2"
    assert len(fake_hub.lookups) == 3
    # a hub that cannot be reached leaves the local copy served
    fake_hub.down = True
    with caplog.at_level("WARNING", logger="server.resolver"):
        assert resolver.resolve("acme/chat@prod").key == "acme/chat@2"
    assert "serving the local copy acme/chat@2" in caplog.text
    # the record survives a restart: a new resolver on the same registry still checks the tag
    fake_hub.down = False
    fake_hub.commits[("acme/chat", "prod")] = "ccc"
    restarted = Resolver(store, FAKE_BASE, hub=fake_hub(HUB, None), hub_refresh_s=0)
    assert restarted.resolve("acme/chat@prod").key == "acme/chat@3"
    assert (store.root / ".hub-pulls.json").is_file() and "acme/chat" in store.names()


def test_refresh_interval_and_local_adapters(store: LocalStore, fake_hub):
    resolver = Resolver(store, FAKE_BASE, hub=fake_hub(HUB, None), hub_refresh_s=3600)
    assert resolver.resolve("acme/chat").key == "acme/chat@1"  # a plain name follows the hub's main
    assert fake_hub.lookups == [("acme/chat", None)]
    fake_hub.commits[("acme/chat", None)] = "moved"
    assert resolver.resolve("acme/chat").key == "acme/chat@1"  # checked less than an hour ago
    register(store, "acme/local")  # registered here, never pulled: the hub is never asked about it
    assert resolver.resolve("acme/local@latest").key == "acme/local@1"
    assert [name for name, _ in fake_hub.lookups] == ["acme/chat"]
    never = Resolver(store, FAKE_BASE, hub=fake_hub(HUB, None), hub_refresh_s=-1)
    assert never.resolve("acme/chat").key == "acme/chat@1" and len(fake_hub.lookups) == 1
