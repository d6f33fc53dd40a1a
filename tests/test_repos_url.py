"""Repository URLs, revisions and credentials (pure: no git, no network)."""

from __future__ import annotations

import base64

import pytest

from hived.repos import Credentials, InvalidRevision, InvalidUrl, parse_rev, parse_url
from hived.repos.git import GitFailed, classify, first_line
from hived.repos.url import ALL_PROTOCOLS


def key(url: str) -> str:
    return parse_url(url, ALL_PROTOCOLS)[0].key


def test_one_repository_one_key():
    assert key("https://GitHub.com/acme/web.git") == key("https://github.com/acme/web") \
        == key("https://github.com:443/acme/web/") == key("https://github.com//acme/web.git/")
    assert key("https://github.com/acme/web") != key("http://github.com/acme/web")
    assert key("https://github.com/acme/web") != key("https://github.com/acme/web2")
    assert key("https://github.com/acme/web") != key("https://github.com:8443/acme/web")
    assert key("ssh://git@github.com/acme/web.git") != key("ssh://other@github.com/acme/web.git")
    assert key("/srv/git/x") == key("file:///srv/git/x/") == key("file://localhost/srv/git/x.git")
    assert key("git+ssh://git@h/x") == key("ssh://git@h/x")
    assert key("git@github.com:acme/web.git") == key("git@github.com:acme/web")


def test_credentials_are_taken_out_of_the_url():
    remote, creds = parse_url("https://builder:t0k%40en@git.example.com/acme/web.git", ("https",))
    assert remote.fetch_url == "https://git.example.com/acme/web.git"
    assert remote.normal == "https://git.example.com/acme/web.git"
    assert remote.netloc == "https://git.example.com/"
    assert creds == Credentials("builder", "t0k@en")
    assert "t0k" not in repr(creds) and "t0k" not in repr(remote)
    # a token given as the user name
    remote, creds = parse_url("https://ghp_abc123@github.com/acme/web", ("https",))
    assert remote.fetch_url == "https://github.com/acme/web" and creds.username == "ghp_abc123"
    assert "ghp_abc123" in creds.secrets()
    assert key("https://u:p@github.com/acme/web") == key("https://github.com/acme/web")


def test_credentials_header():
    c = Credentials.token("tok")
    assert c.header() == "Authorization: Basic " + base64.b64encode(b"x-access-token:tok").decode()
    assert c.fingerprint("k1") != c.fingerprint("k2") != Credentials.token("other").fingerprint("k2")
    assert "tok" not in c.fingerprint("k1")


def test_ssh_forms():
    remote, creds = parse_url("git@github.com:acme/web.git", ("ssh",))
    assert remote.scheme == "ssh" and remote.fetch_url == "git@github.com:acme/web.git" and creds is None
    assert remote.normal == "ssh://git@github.com/~/acme/web.git"
    remote, _ = parse_url("ssh://git@host.example:2222/srv/x.git", ("ssh",))
    assert remote.fetch_url == "ssh://git@host.example:2222/srv/x.git"
    remote, _ = parse_url("ssh://[::1]:2222/x", ("ssh",))
    assert remote.fetch_url == "ssh://[::1]:2222/x"


@pytest.mark.parametrize("url,why", [
    ("", "no repository URL"),
    ("ext::sh -c touch% /tmp/pwned", "transport helper"),
    ("EXT::sh", "transport helper"),
    ("fd::17", "transport helper"),
    ("https::example.com/x", "transport helper"),
    ("--upload-pack=touch /tmp/x", "starts with '-'"),
    ("-oProxyCommand=x:y", "starts with '-'"),
    ("ssh://-oProxyCommand=touch%20x/y", "host"),
    ("ssh://-o/x", "host"),
    ("ssh://user@-host/x", "host"),
    ("ssh://-user@host/x", "user name"),
    ("git@-host:x", "host"),
    ("-user@host:x", "starts with '-'"),
    ("host:-x/y", "path segment"),
    ("https://host/-x", "path segment"),
    ("https://host/a/%2Dx", "path segment"),
    ("git://h/x\n--upload-pack=y", "control characters"),
    ("https://h/x\r", "control characters"),
    (" https://h/x", "spaces"),
    ("relative/path", "not an absolute path"),
    ("./x", "not an absolute path"),
    ("ftp://h/x", "protocol 'ftp'"),
    ("file://otherhost/x", "names a host"),
    ("ssh://user:pw@h/x", "password"),
    ("https://h/x#frag", "fragment"),
    ("https:///x", "no valid host"),
    ("https://h:99999/x", "malformed"),
    ("https://h" + "/x" * 2000, "longer than"),
])
def test_bad_urls(url, why):
    with pytest.raises(InvalidUrl) as e:
        parse_url(url, ALL_PROTOCOLS)
    assert why in str(e.value)
    assert "\n" not in str(e.value) and "\r" not in str(e.value)


def test_protocol_allowlist():
    for url, scheme in (("https://h/x", "https"), ("http://h/x", "http"), ("ssh://h/x", "ssh"),
                        ("h:x", "ssh"), ("git://h/x", "git"), ("/srv/x", "file"), ("file:///srv/x", "file")):
        assert parse_url(url, (scheme,))[0].scheme == scheme
        others = tuple(p for p in ALL_PROTOCOLS if p != scheme)
        with pytest.raises(InvalidUrl, match="does not allow"):
            parse_url(url, others)
    with pytest.raises(InvalidUrl, match=r"allowed: https, ssh, git"):
        parse_url("/srv/x")  # the default: file:// is opt-in


@pytest.mark.parametrize("rev,kind,name", [
    ("main", "name", "main"),
    ("release/1.2", "name", "release/1.2"),
    ("v1.0.0", "name", "v1.0.0"),
    ("refs/heads/main", "ref", "refs/heads/main"),
    ("refs/tags/v1", "ref", "refs/tags/v1"),
    ("refs/pull/7/head", "ref", "refs/pull/7/head"),
    ("HEAD", "ref", "HEAD"),
    (None, "ref", "HEAD"),
    ("", "ref", "HEAD"),
    ("a" * 40, "commit", "a" * 40),
    ("A" * 40, "commit", "a" * 40),
    ("b" * 64, "commit", "b" * 64),
    ("abc1234", "name", "abc1234"),
])
def test_revisions(rev, kind, name):
    r = parse_rev(rev)
    assert (r.kind, r.name) == (kind, name)


def test_revision_refspecs():
    assert parse_rev("main").extra_refspec is None
    assert parse_rev("refs/heads/x").extra_refspec is None
    assert parse_rev("refs/pull/7/head").extra_refspec == "+refs/pull/7/head:refs/pull/7/head"
    assert parse_rev("HEAD").extra_refspec == "+HEAD:refs/hived/HEAD"


@pytest.mark.parametrize("rev", ["-x", "--upload-pack=touch /tmp/x", "a..b", "a b", "a\nb", "x^", "x~1", "x:y",
                                 "x?", "x*", "x[", "x\\y", "@{-1}", "@", ".x", "a/.b", "x.lock", "a//b", "x/",
                                 "/x", "x.", "refs/x", "r" * 2000])
def test_bad_revisions(rev):
    with pytest.raises(InvalidRevision):
        parse_rev(rev)


def test_git_messages_become_one_precise_line():
    remote, creds = parse_url("https://u:sekret@h/x", ("https",))

    def err(stderr, rc=128, timeout=None):
        return classify(GitFailed(["fetch"], rc, stderr, timeout), "fetching", remote, "main", creds)

    cases = [
        ("fatal: Authentication failed for 'https://h/x/'\n", "AuthError"),
        ("fatal: could not read Username for 'https://h': terminal prompts disabled\n", "AuthError"),
        ("fatal: repository 'https://h/x/' not found\n", "RepoNotFound"),
        ("fatal: remote error: access denied or repository not exported: /x\n", "RepoNotFound"),
        ("fatal: couldn't find remote ref refs/heads/main\n", "RevisionNotFound"),
        ("fatal: unable to connect to h:\nh[0: 1.2.3.4]: errno=Connection refused\n", "RemoteUnavailable"),
        ("fatal: early EOF\nfatal: index-pack failed\n", "RemoteUnavailable"),
        ("fatal: write error: No space left on device\n", "CacheFull"),
        ("fatal: transport 'ext' not allowed\n", "InvalidUrl"),
        ("fatal: something new\n", "GitError"),
    ]
    for stderr, cls in cases:
        e = err(stderr)
        assert type(e).__name__ == cls, (stderr, e)
        assert "\n" not in str(e) and "https://h/x" in str(e)
    assert "Connection refused" in str(err(cases[5][0]))
    assert "timed out" in str(err("", None, 30.0))
    assert "sekret" not in first_line("fatal: bad header sekret\n", creds.secrets())
