"""GitHubClient against a fake GitHub served through ``responses``: caching, single flight, errors, counting."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import pytest
import requests
import responses
from freezegun import freeze_time
from urllib3.util.retry import Retry

from reconciler.github import (
    OUTAGE_ATTEMPTS,
    CommitNotFound,
    GitHubClient,
    GitHubDown,
    GitHubUnavailable,
    RateLimited,
    RepositoryNotReadable,
    counting_retry_class,
    repository_from_url,
)
from reconciler.run import STOPPING_REQUEST_TIMEOUT, StopFlag, Stopping
from tests.fakes.github import START, FakeGitHub, InMemoryCache, SilentServer, github_config

TOKEN = "ghp_SUPERsecretTOKENvalue0123456789abcdef"
CountingRetry = counting_retry_class()  # built on PyGithub's GithubRetry, which the package imports only when asked


class Sleeps:
    """Stands in for ``time.sleep``: records the waits instead of sleeping."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def fake(rsps: responses.RequestsMock, monkeypatch: pytest.MonkeyPatch) -> FakeGitHub:
    monkeypatch.setenv("GITHUB_TOKEN", TOKEN)
    return FakeGitHub(rsps, token=TOKEN)


@pytest.fixture
def cache() -> InMemoryCache:
    return InMemoryCache()


def client_for(cache: InMemoryCache, url: str = "https://api.github.com", **config: Any) -> GitHubClient:
    return GitHubClient(github_config(url, **config), cache, sleep=Sleeps(), backoff_factor=0)


# -- commits -------------------------------------------------------------------------------------------


def test_commit_by_full_sha(fake: FakeGitHub, cache: InMemoryCache) -> None:
    sha = fake.add_commit("acme/api", message="Fix the login page\n\nBody.")
    client = client_for(cache)
    commit = client.commit("acme/api", sha.upper())
    assert commit.sha == sha
    assert commit.repo == "acme/api"
    assert commit.repo_url == "https://github.com/acme/api"
    assert commit.message == "Fix the login page\n\nBody."
    assert commit.date == START
    assert client.requests == 1 == fake.count("commit")
    assert cache.keys("commit") == [f"acme/api@{sha}"]


def test_every_spelling_of_a_repository_gives_one_canonical_repo_url(fake: FakeGitHub, cache: InMemoryCache) -> None:
    sha = fake.add_commit("acme/api")
    client = client_for(cache)
    spellings = ["Acme/API", "acme/api", "ACME/Api"]
    assert {client.commit(repo, sha).repo_url for repo in spellings} == {"https://github.com/acme/api"}
    assert {client.commit(repo, sha).repo for repo in spellings} == {"acme/api"}
    assert client.requests == 1, "one cache entry serves every spelling"
    for url in ("https://github.com/Acme/API.git", "git@github.com:acme/api.git", "https://GitHub.com/ACME/api/"):
        assert repository_from_url(url, "https://github.com") == "acme/api"


def test_author_date_first_then_committer_date(fake: FakeGitHub, cache: InMemoryCache) -> None:
    authored = datetime(2026, 1, 1, 8, 0, tzinfo=UTC)
    committed = datetime(2026, 1, 2, 8, 0, tzinfo=UTC)
    rebased = fake.add_commit("acme/api", author_date=authored, committer_date=committed)
    assert client_for(cache).commit("acme/api", rebased).date == authored

    fake.repos["acme/api"].commits[rebased].author_date = None
    assert client_for(InMemoryCache()).commit("acme/api", rebased).date == committed

    undated = fake.add_commit("acme/api", dated=False)
    assert client_for(InMemoryCache()).commit("acme/api", undated).date is None


def test_short_sha_is_expanded_with_a_real_request(fake: FakeGitHub, cache: InMemoryCache) -> None:
    """With lazy PyGithub objects ``get_commit("abc1234").sha`` is just the input: the client must fetch."""
    sha = fake.add_commits("acme/api", 3)[1]
    client = client_for(cache)
    commit = client.commit("acme/api", sha[:7])
    assert commit.sha == sha and len(commit.sha) == 40
    assert fake.paths("commit") == [f"/repos/acme/api/commits/{sha[:7]}"]
    assert client.commit("acme/api", sha) == commit, "the full SHA is known too, without a request"
    assert client.requests == 1

    client.reset_tick()
    assert client.commit("acme/api", sha[:7]) == commit
    assert client.requests == 0, "the short -> full mapping and the commit come from the store"


def test_unknown_sha_is_commit_not_found(fake: FakeGitHub, cache: InMemoryCache) -> None:
    fake.add_commits("acme/api", 2)
    client = client_for(cache)
    with pytest.raises(CommitNotFound) as caught:
        client.commit("acme/api", "abcdef1")
    assert "422" in caught.value.reason and "No commit found" in caught.value.reason
    with pytest.raises(CommitNotFound):
        client.commit("acme/api", "abcdef1")
    assert client.requests == 1, "a failed lookup is not repeated within a tick"


def test_not_a_sha_is_rejected_without_a_request(fake: FakeGitHub, cache: InMemoryCache) -> None:
    client = client_for(cache)
    for ref in ("main", "v1.2.3", "../../etc"):
        with pytest.raises(CommitNotFound):
            client.commit("acme/api", ref)
    with pytest.raises(CommitNotFound):
        client.commit("not a repo", "a" * 40)
    assert client.requests == 0


# -- compare -------------------------------------------------------------------------------------------


def test_compare_over_300_commits_returns_all_of_them_oldest_first(fake: FakeGitHub, cache: InMemoryCache) -> None:
    shas = fake.add_commits("acme/api", 301)
    client = client_for(cache)
    comparison = client.compare("acme/api", shas[0], shas[300], 1000)
    assert comparison.status == "ahead"
    assert comparison.total == 300
    assert [c.sha for c in comparison.commits] == shas[1:]
    assert not comparison.truncated
    assert fake.count("compare") == 3, "three pages of 100, past GitHub's 250-commit unpaginated cap"
    assert client.requests == 3


def test_compare_cap_stops_fetching_early(fake: FakeGitHub, cache: InMemoryCache) -> None:
    shas = fake.add_commits("acme/api", 301)
    client = client_for(cache)
    comparison = client.compare("acme/api", shas[0], shas[300], 120)
    assert [c.sha for c in comparison.commits] == shas[1:121]
    assert comparison.total == 300 and comparison.truncated
    assert fake.count("compare") == 2

    client.reset_tick()
    again = client.compare("acme/api", shas[0], shas[300], 120)
    assert again == comparison and client.requests == 0
    client.reset_tick()
    bigger = client.compare("acme/api", shas[0], shas[300], 1000)
    assert len(bigger.commits) == 300, "a cached answer with fewer commits than now allowed is fetched again"


def test_compare_is_cached_by_full_shas_and_seeds_the_commit_cache(fake: FakeGitHub, cache: InMemoryCache) -> None:
    shas = fake.add_commits("acme/api", 5)
    client = client_for(cache)
    first = client.compare("acme/api", shas[0], shas[4], 1000)
    assert f"acme/api:{shas[0]}...{shas[4]}" in cache.keys("compare")
    client.reset_tick()
    assert client.compare("acme/api", shas[0], shas[4], 1000) == first
    assert client.commit("acme/api", shas[2]).sha == shas[2]
    assert client.requests == 0


def test_compare_of_short_shas_is_not_cached(fake: FakeGitHub, cache: InMemoryCache) -> None:
    shas = fake.add_commits("acme/api", 3)
    client_for(cache).compare("acme/api", shas[0][:8], shas[2][:8], 10)
    assert cache.keys("compare") == []


def test_commits_a_compare_returned_are_looked_up_without_a_request(fake: FakeGitHub, cache: InMemoryCache) -> None:
    shas = fake.add_commits("acme/api", 5)
    client = client_for(cache)
    client.compare("acme/api", shas[0], shas[4], 1000)
    for sha in shas[1:]:
        commit = client.commit("acme/api", sha)
        assert commit.sha == sha and commit.message.startswith("Change") and commit.date is not None
    assert fake.count("all") == 1 == client.requests


def test_compare_to_a_short_head_learns_its_full_sha_and_caches_both(fake: FakeGitHub, cache: InMemoryCache) -> None:
    shas = fake.add_commits("acme/api", 4)
    short = shas[3][:8]
    client = client_for(cache)
    comparison = client.compare("acme/api", shas[0], short, 1000)
    assert [c.sha for c in comparison.commits] == shas[1:]
    assert comparison.find(short) is not None and comparison.find(short) == comparison.find(shas[3])
    assert client.commit("acme/api", short).sha == shas[3]
    assert client.compare("acme/api", shas[0], shas[3], 1000) == comparison
    assert fake.paths() == [f"/repos/acme/api/compare/{shas[0]}...{short}"]

    client.reset_tick()
    assert client.compare("acme/api", shas[0], short, 1000) == comparison
    assert client.commit("acme/api", short).sha == shas[3]
    assert client.requests == 0, "the next tick has the short SHA, the range and the commits in the store"


def test_a_short_head_is_found_only_in_a_complete_comparison(fake: FakeGitHub, cache: InMemoryCache) -> None:
    shas = fake.add_commits("acme/api", 6)
    client = client_for(cache)
    capped = client.compare("acme/api", shas[0], shas[5][:8], 2)
    assert capped.truncated and capped.find(shas[5][:8]) is None
    assert capped.find(shas[1]) is not None, "a full SHA is found by equality"
    assert client.compare("acme/api", shas[5], shas[2][:8], 10).find(shas[2][:8]) is None, "behind: no commits"


def test_rollback_is_behind_with_no_commits(fake: FakeGitHub, cache: InMemoryCache) -> None:
    shas = fake.add_commits("acme/api", 4)
    comparison = client_for(cache).compare("acme/api", shas[3], shas[1], 1000)
    assert comparison.status == "behind"
    assert comparison.commits == () and comparison.total == 0


def test_diverged_is_kept_and_logged(fake: FakeGitHub, cache: InMemoryCache, caplog: pytest.LogCaptureFixture) -> None:
    main = fake.add_commits("acme/api", 3)
    side = fake.add_commit("acme/api", parent=main[0], message="hotfix on a branch")
    caplog.set_level(logging.WARNING, logger="reconciler.github")
    comparison = client_for(cache).compare("acme/api", side, main[2], 1000)
    assert comparison.status == "diverged"
    assert [c.sha for c in comparison.commits] == main[1:]
    assert any("diverged" in record.getMessage() for record in caplog.records)


def test_compare_with_unknown_base_is_commit_not_found(fake: FakeGitHub, cache: InMemoryCache) -> None:
    shas = fake.add_commits("acme/api", 2)
    with pytest.raises(CommitNotFound) as caught:
        client_for(cache).compare("acme/api", "f" * 40, shas[1], 1000)
    assert "404" in caught.value.reason


# -- rate limits and failures --------------------------------------------------------------------------


def test_primary_rate_limit_is_rate_limited_with_the_reset_time(fake: FakeGitHub, cache: InMemoryCache) -> None:
    sha = fake.add_commit("acme/api")
    other = fake.add_commit("acme/web")
    reset = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)
    fake.exhaust_rate_limit(reset)
    with freeze_time("2026-01-05 09:30:00") as clock:
        client = client_for(cache)
        with pytest.raises(RateLimited) as caught:
            client.commit("acme/api", sha)
        assert caught.value.reset_at == reset
        assert client.rate_limit_remaining == 0
        assert client.rate_limit_reset == reset
        with pytest.raises(RateLimited):
            client.commit("acme/api", sha)
        with pytest.raises(RateLimited) as refused:
            client.commit("acme/web", other)
        assert refused.value.reset_at == reset
        assert client.requests == 1, "while rate limited nothing more is sent (GitHub bans clients that insist)"

        clock.move_to("2026-01-05 09:45:00")
        client.reset_tick()
        with pytest.raises(RateLimited):
            client.commit("acme/api", sha)
        assert client.requests == 0, "a new tick before the reset does not ask either"

        fake.restore_rate_limit(reset_at=datetime(2026, 1, 5, 11, 0, tzinfo=UTC))
        clock.move_to("2026-01-05 10:00:01")
        client.reset_tick()
        assert client.commit("acme/api", sha).sha == sha
        assert client.rate_limit_remaining == fake.remaining > 0


def test_primary_rate_limit_reset_soon_is_waited_for_within_the_limit(fake: FakeGitHub, cache: InMemoryCache) -> None:
    """A reset within ``max_rate_limit_wait`` is retried, not turned into a deferral."""
    sha = fake.add_commit("acme/api")
    body = {"message": "API rate limit exceeded for user ID 1."}
    with freeze_time("2026-01-05 09:00:00"):
        reset = str(int(datetime(2026, 1, 5, 9, 0, 20, tzinfo=UTC).timestamp()))
        fake.reply_next(403, body, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": reset})
        client = client_for(cache, max_rate_limit_wait="60s")
        assert client.commit("acme/api", sha).sha == sha
    assert client.requests == 2


def test_rate_limit_403_with_an_unusual_message_is_still_rate_limited(fake: FakeGitHub, cache: InMemoryCache) -> None:
    sha = fake.add_commit("acme/api")
    reset = int(datetime(2030, 1, 1, tzinfo=UTC).timestamp())
    fake.reply_next(403, {"message": "quota"}, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(reset)})
    with pytest.raises(RateLimited) as caught:
        client_for(cache).commit("acme/api", sha)
    assert caught.value.reset_at == datetime(2030, 1, 1, tzinfo=UTC)


def test_secondary_rate_limit_is_rate_limited(fake: FakeGitHub, cache: InMemoryCache) -> None:
    sha = fake.add_commit("acme/api")
    fake.secondary_limited = True
    with freeze_time("2026-01-05 09:00:00"), pytest.raises(RateLimited) as caught:
        client_for(cache).commit("acme/api", sha)
    assert caught.value.reset_at == datetime(2026, 1, 5, 9, 1, tzinfo=UTC), "GitHub: wait at least a minute"


def test_429_without_retry_after_is_rate_limited(fake: FakeGitHub, cache: InMemoryCache) -> None:
    sha = fake.add_commit("acme/api")
    fake.reply_next(429, {"message": "Too Many Requests"})
    with pytest.raises(RateLimited):
        client_for(cache).commit("acme/api", sha)


def test_429_with_a_long_retry_after_is_not_slept_through(fake: FakeGitHub, cache: InMemoryCache) -> None:
    sha = fake.add_commit("acme/api")
    fake.reply_next(429, {"message": "Too Many Requests"}, {"Retry-After": "600"})
    with freeze_time("2026-01-05 09:00:00"):
        client = client_for(cache, max_rate_limit_wait="30s")
        with pytest.raises(RateLimited) as caught:
            client.commit("acme/api", sha)
    assert caught.value.reset_at == datetime(2026, 1, 5, 9, 10, tzinfo=UTC)
    assert client.requests == 1


def test_429_with_a_short_retry_after_is_retried(fake: FakeGitHub, cache: InMemoryCache) -> None:
    sha = fake.add_commit("acme/api")
    fake.reply_next(429, {"message": "Too Many Requests"}, {"Retry-After": "2"})
    client = client_for(cache, max_rate_limit_wait="30s")
    assert client.commit("acme/api", sha).sha == sha
    assert client.requests == 2 == fake.count("commit")


def test_server_errors_are_retried_then_unavailable(fake: FakeGitHub, cache: InMemoryCache) -> None:
    sha = fake.add_commit("acme/api")
    fake.fail_next(10, 502)
    client = client_for(cache)
    with pytest.raises(GitHubUnavailable):
        client.commit("acme/api", sha)
    assert client.requests == 6 == fake.count("commit"), "one request and five retries, every one counted"


def test_a_transient_server_error_is_retried(fake: FakeGitHub, cache: InMemoryCache) -> None:
    sha = fake.add_commit("acme/api")
    fake.fail_next(2, 503)
    client = client_for(cache)
    assert client.commit("acme/api", sha).sha == sha
    assert client.requests == 3


@pytest.mark.parametrize(
    "error",
    [
        requests.exceptions.ConnectionError("connection refused"),
        requests.exceptions.ReadTimeout("read timed out"),
        requests.exceptions.ConnectTimeout("connect timed out"),
    ],
)
def test_transport_errors_are_unavailable(fake: FakeGitHub, cache: InMemoryCache, error: Exception) -> None:
    sha = fake.add_commit("acme/api")
    fake.raise_next(error)
    client = client_for(cache)
    with pytest.raises(GitHubUnavailable):
        client.commit("acme/api", sha)
    assert client.requests == 1


# -- repositories GitHub cannot read, and commits it does not have --------------------------------------


def test_a_repository_the_token_cannot_see_is_named_once_and_never_taken_for_a_missing_commit(
    fake: FakeGitHub, cache: InMemoryCache, caplog: pytest.LogCaptureFixture
) -> None:
    shas = fake.add_commits("acme/private", 3)
    fake.hide("acme/private")
    caplog.set_level(logging.ERROR, logger="reconciler.github")
    client = client_for(cache)
    with pytest.raises(RepositoryNotReadable) as caught:
        client.commit("acme/private", shas[2])
    assert caught.value.repo == "acme/private" and "cannot read" in caught.value.reason
    with pytest.raises(RepositoryNotReadable):
        client.compare("acme/private", shas[0], shas[2], 1000)
    with pytest.raises(RepositoryNotReadable):
        client.commit("acme/private", shas[1][:8])
    assert fake.paths() == [f"/repos/acme/private/commits/{shas[2]}", "/repos/acme/private"]
    assert [r.__dict__.get("repository") for r in caplog.records] == ["acme/private"], "logged once"
    assert client.tick_problems() == [f"GitHub repository acme/private: {caught.value.reason.split(': ', 1)[1]}"]

    fake.hide("acme/private", hidden=False)
    client.reset_tick()
    assert client.tick_problems() == []
    assert client.commit("acme/private", shas[2]).sha == shas[2], "once access is fixed, the next tick reads it"


def test_a_repository_that_does_not_exist_is_not_readable(fake: FakeGitHub, cache: InMemoryCache) -> None:
    client = client_for(cache)
    with pytest.raises(RepositoryNotReadable):
        client.commit("acme/missing", "a" * 40)


def test_a_404_in_a_readable_repository_is_a_missing_commit(fake: FakeGitHub, cache: InMemoryCache) -> None:
    shas = fake.add_commits("acme/api", 2)
    client = client_for(cache)
    with pytest.raises(CommitNotFound) as caught:
        client.compare("acme/api", "f" * 40, shas[1], 1000)
    assert caught.value.status == 404
    with pytest.raises(CommitNotFound) as unknown:
        client.commit("acme/api", "e" * 40)
    assert unknown.value.status == 422
    assert fake.count("repo") == 1 and client.tick_problems() == []


# -- GitHub down: the circuit breaker ------------------------------------------------------------------


def test_a_server_error_streak_over_two_requests_stops_every_later_request(
    fake: FakeGitHub, cache: InMemoryCache, caplog: pytest.LogCaptureFixture
) -> None:
    shas = fake.add_commits("acme/api", 4)
    fake.fail_next(100, 502)
    caplog.set_level(logging.ERROR, logger="reconciler.github")
    client = client_for(cache)
    with pytest.raises(GitHubUnavailable) as first:
        client.commit("acme/api", shas[0])
    assert not isinstance(first.value, GitHubDown), "one request failing alone does not make GitHub down"
    assert client.requests == OUTAGE_ATTEMPTS
    with pytest.raises(GitHubDown):
        client.commit("acme/api", shas[1])
    assert client.requests == OUTAGE_ATTEMPTS + 1, "the second request's first failure opens it: no retries"
    for later in (lambda: client.commit("acme/api", shas[2]), lambda: client.compare("acme/api", shas[0], shas[3], 9)):
        with pytest.raises(GitHubDown):
            later()
    assert client.requests == OUTAGE_ATTEMPTS + 1, "nothing more is sent this tick"
    assert [r.getMessage() for r in caplog.records] == ["GitHub is down for the rest of this run"]
    assert any("not answering" in problem for problem in client.tick_problems())

    fake.canned.clear()
    client.reset_tick()
    assert client.commit("acme/api", shas[2]).sha == shas[2], "the next tick tries again"


def test_an_answer_between_failures_keeps_the_breaker_closed(fake: FakeGitHub, cache: InMemoryCache) -> None:
    shas = fake.add_commits("acme/api", 3)
    client = client_for(cache)
    fake.fail_next(OUTAGE_ATTEMPTS, 502)
    with pytest.raises(GitHubUnavailable):
        client.commit("acme/api", shas[0])
    assert client.commit("acme/api", shas[1]).sha == shas[1]
    fake.fail_next(1, 502)
    assert client.commit("acme/api", shas[2]).sha == shas[2], "retried: the streak started again at the answer"
    assert client.tick_problems() == []


def test_timeouts_raised_by_the_transport_count_towards_the_breaker(fake: FakeGitHub, cache: InMemoryCache) -> None:
    shas = fake.add_commits("acme/api", OUTAGE_ATTEMPTS + 2)
    for _ in range(50):
        fake.raise_next(requests.exceptions.ReadTimeout("read timed out"))
    client = client_for(cache)
    for sha in shas[:OUTAGE_ATTEMPTS]:
        with pytest.raises(GitHubUnavailable):
            client.commit("acme/api", sha)
    with pytest.raises(GitHubDown):
        client.commit("acme/api", shas[OUTAGE_ATTEMPTS])
    assert client.requests == OUTAGE_ATTEMPTS


def test_a_github_that_never_answers_costs_a_few_timeouts_not_every_attempt_of_every_lookup(
    cache: InMemoryCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", TOKEN)
    shas = [f"{i:x}" * 40 for i in range(10, 16)]
    with SilentServer() as silent:
        client = client_for(cache, silent.url, timeout="50ms")
        with pytest.raises(GitHubUnavailable) as first:
            client.commit("acme/api", shas[0])
        assert "timed out" in first.value.reason or "cannot reach" in first.value.reason
        assert client.requests == OUTAGE_ATTEMPTS, "one lookup: its first attempt and every retry timed out"
        with ThreadPoolExecutor(max_workers=4) as pool:
            outcomes = list(pool.map(lambda sha: _raised(lambda: client.commit("acme/api", sha)), shas[1:]))
        assert all(isinstance(outcome, GitHubDown) for outcome in outcomes)
        assert OUTAGE_ATTEMPTS + 1 <= client.requests <= OUTAGE_ATTEMPTS + 4, "only requests already in flight"
        assert silent.accepted <= client.requests


def _raised(call: Any) -> BaseException | None:
    try:
        call()
    except Exception as error:
        return error
    return None


def test_bad_credentials_never_show_the_token(
    rsps: responses.RequestsMock,
    cache: InMemoryCache,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeGitHub(rsps, token="ghp_theRIGHTtoken")
    sha = fake.add_commit("acme/api")
    monkeypatch.setenv("GITHUB_TOKEN", TOKEN)
    caplog.set_level(logging.DEBUG)
    client = client_for(cache)
    with pytest.raises(GitHubUnavailable) as caught:
        client.commit("acme/api", sha)
    assert "bad credentials" in str(caught.value)
    for text in (str(caught.value), repr(caught.value), caplog.text, repr(client), repr(vars(client))):
        assert TOKEN not in text
    assert fake.count("commit") == 1, "401 is not retried"


def test_forbidden_without_rate_limit_is_unavailable(fake: FakeGitHub, cache: InMemoryCache) -> None:
    sha = fake.add_commit("acme/api")
    fake.reply_next(403, {"message": "Resource protected by organization SAML enforcement."})
    with pytest.raises(GitHubUnavailable) as caught:
        client_for(cache).commit("acme/api", sha)
    assert "SAML" in caught.value.reason


def test_retry_backoff_goes_through_the_injected_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(seconds: float) -> None:
        raise AssertionError("time.sleep must not be called")

    monkeypatch.setattr("time.sleep", forbidden)
    sleeps = Sleeps()
    attempts: list[int] = []
    retry: Retry = CountingRetry(on_attempt=lambda: attempts.append(1), sleep=sleeps, total=5, backoff_factor=1)
    for _ in range(3):
        retry = retry.increment(method="GET", url="/x", error=ConnectionError("reset"))
    assert isinstance(retry, CountingRetry)
    retry.sleep()
    assert sleeps.calls == [4.0]
    assert len(attempts) == 3


# -- single flight and counting ------------------------------------------------------------------------


def test_concurrent_lookups_of_one_commit_send_one_request(fake: FakeGitHub, cache: InMemoryCache) -> None:
    sha = fake.add_commit("acme/api")
    client = client_for(cache)
    fake.gate = threading.Event()
    with ThreadPoolExecutor(max_workers=16) as pool:
        futures = [pool.submit(client.commit, "acme/api", sha) for _ in range(32)]
        assert fake.entered.wait(10)
        fake.gate.set()
        results = {future.result() for future in futures}
    assert len(results) == 1
    assert client.requests == 1 == fake.count("commit")


def test_concurrent_distinct_lookups_do_not_mix_up_responses(
    fake: FakeGitHub, cache: InMemoryCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PyGithub's connection object keeps the URL between ``request()`` and ``getresponse()`` in instance
    attributes (PyGithub PR #2052). Holding every thread in that window makes a shared instance send the
    wrong URLs; the client's pool of instances must not."""
    from github.Requester import HTTPSRequestsConnectionClass

    barrier = threading.Barrier(8, timeout=10)
    original = HTTPSRequestsConnectionClass.request

    def request_then_wait(self: HTTPSRequestsConnectionClass, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        barrier.wait()

    monkeypatch.setattr(HTTPSRequestsConnectionClass, "request", request_then_wait)
    shas = {f"acme/svc{i}": fake.add_commits(f"acme/svc{i}", 2) for i in range(24)}
    client = client_for(cache, max_concurrency=8)
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda repo: (repo, client.commit(repo, shas[repo][1])), shas))
    for repo, commit in results:
        assert commit.repo == repo and commit.sha == shas[repo][1]
        assert commit.message.endswith(f"of {repo}\n\nLonger description.")
    assert client.requests == 24


def test_reset_tick_clears_the_memo_and_the_counter_but_not_the_store(fake: FakeGitHub, cache: InMemoryCache) -> None:
    sha = fake.add_commit("acme/api")
    client = client_for(cache)
    client.commit("acme/api", sha)
    client.reset_tick()
    assert client.requests == 0
    cache.data.clear()
    client.commit("acme/api", sha)
    assert client.requests == 1 and client.total_requests == 2


def test_a_broken_cache_is_a_cache_miss(fake: FakeGitHub) -> None:
    class Broken:
        def cache_get(self, kind: str, keys: Any) -> dict[str, str]:
            raise ConnectionError("redis down")

        def cache_put(self, kind: str, items: Any) -> None:
            raise ConnectionError("redis down")

    sha = fake.add_commit("acme/api")
    client = GitHubClient(github_config(), Broken(), sleep=Sleeps(), backoff_factor=0)
    assert client.commit("acme/api", sha).sha == sha


def test_corrupt_cache_entries_are_fetched_again(fake: FakeGitHub, cache: InMemoryCache) -> None:
    shas = fake.add_commits("acme/api", 3)
    cache.cache_put("commit", {f"acme/api@{shas[2]}": "{not json"})
    cache.cache_put("compare", {f"acme/api:{shas[0]}...{shas[2]}": '{"v": 99}'})
    client = client_for(cache)
    assert client.commit("acme/api", shas[2]).sha == shas[2]
    assert len(client.compare("acme/api", shas[0], shas[2], 10).commits) == 2
    assert client.requests == 2


# -- Enterprise, search, rate_limit, App auth ----------------------------------------------------------


def test_github_enterprise_base_url(
    rsps: responses.RequestsMock, cache: InMemoryCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", TOKEN)
    fake = FakeGitHub(rsps, api_url="https://ghe.example.com/api/v3", token=TOKEN)
    shas = fake.add_commits("platform/api", 3)
    client = client_for(cache, url="https://ghe.example.com/api/v3")
    commit = client.commit("platform/api", shas[2][:10])
    assert commit.repo_url == "https://ghe.example.com/platform/api"
    assert len(client.compare("platform/api", shas[0], shas[2], 100).commits) == 2
    assert client.find_repository(shas[1]) == "platform/api"
    assert [str(call.request.url).split("/api/v3/")[0] for call in rsps.calls] == ["https://ghe.example.com:443"] * 3


def test_search_fallback_prefers_the_original_over_forks_and_is_cached(fake: FakeGitHub, cache: InMemoryCache) -> None:
    shas = fake.add_commits("acme/api", 2)
    fake.add_repo("someone/api-fork", fork_of="acme/api")
    fake.repos["acme/api"] = fake.repos.pop("acme/api")  # the fork is listed first
    client = client_for(cache)
    client.commit("acme/api", shas[0])
    core_remaining = client.rate_limit_remaining
    assert client.find_repository(shas[1]) == "acme/api"
    assert client.find_repository(shas[1]) == "acme/api"
    assert fake.count("search") == 1
    assert client.rate_limit_remaining == core_remaining, "the search API's own limit is not the core one"
    client.reset_tick()
    assert client.find_repository(shas[1]) == "acme/api"
    assert fake.count("search") == 1, "sha -> repo comes from the store on later ticks"


def test_search_without_result_is_none_and_not_cached(fake: FakeGitHub, cache: InMemoryCache) -> None:
    client = client_for(cache)
    assert client.find_repository("abcdef1234567") is None
    client.reset_tick()
    assert client.find_repository("abcdef1234567") is None
    assert fake.count("search") == 2
    assert client.find_repository("1234") is None, "too short to search"


def test_rate_limit_overview(fake: FakeGitHub, cache: InMemoryCache) -> None:
    remaining, limit, reset = client_for(cache).rate_limit()
    assert (remaining, limit) == (5000, 5000)
    assert reset == fake.reset_at


def test_github_app_installation_token_is_fetched_once_and_shared(
    rsps: responses.RequestsMock, cache: InMemoryCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    monkeypatch.setenv("APP_KEY", pem)
    monkeypatch.delenv("GITHUB_TOKEN", raising=False)
    fake = FakeGitHub(rsps, app_installation_id=77)
    shas = {f"acme/svc{i}": fake.add_commit(f"acme/svc{i}") for i in range(12)}
    client = client_for(cache, app_id=12345, app_installation_id=77, app_private_key_env="APP_KEY")
    with ThreadPoolExecutor(max_workers=6) as pool:
        commits = list(pool.map(lambda repo: client.commit(repo, shas[repo]), shas))
    assert [c.sha for c in commits] == list(shas.values())
    assert fake.tokens_issued == 1 == fake.count("token")
    assert client.requests == 13, "the token request is counted too"


def test_github_app_without_its_key_is_unavailable(
    rsps: responses.RequestsMock, cache: InMemoryCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("APP_KEY", raising=False)
    fake = FakeGitHub(rsps, app_installation_id=77)
    sha = fake.add_commit("acme/api")
    client = client_for(cache, app_id=1, app_installation_id=77, app_private_key_env="APP_KEY")
    with pytest.raises(GitHubUnavailable) as caught:
        client.commit("acme/api", sha)
    assert "APP_KEY" in caught.value.reason
    assert client.requests == 0


@pytest.mark.parametrize(
    ("url", "web_url", "repo"),
    [
        ("https://github.com/acme/deploy", "https://github.com", "acme/deploy"),
        ("https://github.com/acme/deploy.git", "https://github.com", "acme/deploy"),
        ("https://github.com/acme/deploy/", "https://github.com", "acme/deploy"),
        ("http://github.com/Acme/Deploy.git", "https://github.com", "acme/deploy"),
        ("https://GitHub.com/acme/deploy", "https://github.com", "acme/deploy"),
        ("https://token@github.com/acme/deploy", "https://github.com", "acme/deploy"),
        ("git@github.com:acme/deploy.git", "https://github.com", "acme/deploy"),
        ("ssh://git@github.com/acme/deploy.git", "https://github.com", "acme/deploy"),
        ("git@ghe.example.com:platform/gitops.git", "https://ghe.example.com", "platform/gitops"),
        ("https://ghe.example.com/platform/gitops", "https://github.com", None),
        ("https://gitlab.com/acme/deploy.git", "https://github.com", None),
        ("https://charts.bitnami.com/bitnami", "https://github.com", None),
        ("oci://ghcr.io/acme/charts", "https://github.com", None),
        ("ghcr.io/acme/charts", "https://github.com", None),
        ("https://github.com/acme", "https://github.com", None),
        ("https://github.com/acme/deploy/tree/main", "https://github.com", None),
        ("", "https://github.com", None),
        ("https://[broken", "https://github.com", None),
        ("https://octocorp.ghe.com/platform/gitops.git", "https://octocorp.ghe.com", "platform/gitops"),
        ("git@octocorp.ghe.com:platform/gitops.git", "https://octocorp.ghe.com", "platform/gitops"),
        ("https://api.octocorp.ghe.com/platform/gitops", "https://octocorp.ghe.com", None),
        ("https://scm.acme.io/github/platform/gitops.git", "https://scm.acme.io/github", "platform/gitops"),
        ("https://scm.acme.io/GitHub/platform/gitops", "https://scm.acme.io/github", "platform/gitops"),
        ("https://scm.acme.io/gitlab/platform/gitops", "https://scm.acme.io/github", None),
        ("https://scm.acme.io/platform/gitops", "https://scm.acme.io/github", None),
    ],
)
def test_repository_from_url(url: str, web_url: str, repo: str | None) -> None:
    assert repository_from_url(url, web_url) == repo


def test_no_token_still_works_unauthenticated(
    rsps: responses.RequestsMock,
    cache: InMemoryCache,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.delenv("GITHUB_TOKEN", raising=False)
    fake = FakeGitHub(rsps)
    sha = fake.add_commit("acme/api")
    caplog.set_level(logging.WARNING, logger="reconciler.github")
    assert client_for(cache).commit("acme/api", sha).sha == sha
    assert "unauthenticated" in caplog.text


def test_a_stop_during_a_retry_wait_ends_the_lookup_as_unavailable_at_once(
    fake: FakeGitHub, cache: InMemoryCache, rsps: responses.RequestsMock
) -> None:
    """``serve`` on SIGTERM: the wait before the next attempt raises ``Stopping`` inside the HTTP stack (urllib3
    calls the retry's sleep); the lookup fails as unavailable, so its deployment is deferred, not lost."""
    shas = fake.add_commits("acme/api", 2)
    stop = StopFlag()
    retry: Retry = CountingRetry(sleep=stop.sleep, total=5, backoff_factor=1)
    retry = retry.increment("GET", "/x", error=ConnectionError("reset")).increment("GET", "/x", error=OSError("r"))
    stop.set()
    with pytest.raises(Stopping):
        retry.sleep()

    client = GitHubClient(github_config(), cache, sleep=stop.sleep, backoff_factor=1, bound_timeout=stop.timeout)
    fake.raise_next(Stopping("stopping: a wait of 2 s between retries was cut short"))
    with pytest.raises(GitHubUnavailable) as raised:
        client.commit("acme/api", shas[0])
    assert raised.value.reason.startswith("stopping: ")
    assert client.commit("acme/api", shas[1]).sha == shas[1], "a request started after the stop still goes out"
    sent = rsps.calls[-1].request
    assert getattr(sent, "req_kwargs", {})["timeout"] == STOPPING_REQUEST_TIMEOUT, "with a bounded timeout"


def test_probe_repository_reads_one_commit_and_names_what_it_cannot_read(
    fake: FakeGitHub, cache: InMemoryCache
) -> None:
    shas = fake.add_commits("acme/api", 3)
    fake.add_repo("acme/empty")
    fake.add_commits("acme/private", 1)
    fake.hide("acme/private")
    client = client_for(cache)
    assert client.probe_repository("acme/api") == shas[-1]
    assert client.probe_repository("acme/empty") is None
    with pytest.raises(RepositoryNotReadable):
        client.probe_repository("acme/private")
    assert client.requests == 3
    assert fake.paths("commits") == [
        "/repos/acme/api/commits",
        "/repos/acme/empty/commits",
        "/repos/acme/private/commits",
    ]


def test_disabled_github_is_never_asked_and_knows_a_commit_by_its_sha_alone(
    fake: FakeGitHub, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``github.enabled: false``: a full SHA is a commit without message or date, which is never cached (once GitHub
    is enabled the same commit gets its message); a short SHA, a range and a search are what GitHub alone knows."""
    monkeypatch.delenv("GITHUB_TOKEN", raising=False)
    sha = fake.add_commit("acme/api")
    cache = InMemoryCache()
    caplog.set_level(logging.INFO, logger="reconciler.github")
    client = client_for(cache, enabled=False)

    commit = client.commit("Acme/API", sha.upper())
    assert (commit.repo, commit.repo_url, commit.sha, commit.message, commit.date) == (
        "acme/api",
        "https://github.com/acme/api",
        sha,
        "",
        None,
    )
    with pytest.raises(CommitNotFound) as short:
        client.commit("acme/api", sha[:7])
    assert short.value.status is None and "cannot be expanded without GitHub" in short.value.reason
    with pytest.raises(CommitNotFound) as compared:
        client.compare("acme/api", sha, "b" * 40, 10)
    assert compared.value.status is None
    assert client.find_repository(sha) is None
    assert client.offline() == "github.enabled is false"

    assert fake.count("all") == 0 and client.requests == 0 and cache.data == {}
    assert [r.getMessage() for r in caplog.records] == ["GitHub is not used this run"], "said once, no token warning"
    client.reset_tick()
    client.commit("acme/api", sha)
    assert [r.getMessage() for r in caplog.records].count("GitHub is not used this run") == 2, "once per run"


def test_the_counting_retry_is_built_once_on_pygithubs_retry() -> None:
    from github.GithubRetry import GithubRetry

    assert counting_retry_class() is CountingRetry
    assert issubclass(CountingRetry, GithubRetry)
    assert isinstance(CountingRetry(total=1).new(total=0), CountingRetry), "urllib3's copies keep the class"


def test_pygithub_is_imported_with_the_first_request_not_with_the_client() -> None:
    """A run with nothing new to deploy asks GitHub nothing: it must not pay PyGithub's import either."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from reconciler.config import GitHubConfig\n"
        "from reconciler.github import GitHubClient\n"
        "from tests.fakes.github import InMemoryCache\n"
        "client = GitHubClient(GitHubConfig(), InMemoryCache())\n"
        "client.reset_tick(); client.tick_problems()\n"
        "print(sorted(name for name in sys.modules if name == 'github' or name.startswith('github.')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
