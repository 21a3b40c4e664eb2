import pytest

from switchover.hosts import parse_host


@pytest.mark.parametrize(
    ("spec", "user", "host", "port"),
    [
        ("web1", None, "web1", None),
        ("deploy@web1.example.com", "deploy", "web1.example.com", None),
        ("deploy@10.0.0.1:2222", "deploy", "10.0.0.1", 2222),
        ("[::1]:22", None, "::1", 22),
        ("root@[fe80::1]", "root", "fe80::1", None),
    ],
)
def test_parse(spec, user, host, port):
    h = parse_host(spec)
    assert (h.user, h.host, h.port) == (user, host, port)
    assert parse_host(h.name) == h


@pytest.mark.parametrize(
    "spec",
    [
        "",
        " web1",
        "web1;rm -rf /",
        "-oProxyCommand=x",
        "web1:0",
        "web1:abc",
        "a b",
        "u$(x)@h",
        "[::1",
        "[zz]:1",
        "web1:22:33",
        "@host",
    ],
)
def test_reject(spec):
    with pytest.raises(ValueError):
        parse_host(spec)
