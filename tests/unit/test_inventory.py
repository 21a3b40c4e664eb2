import pytest

from switchover.inventory import InventoryError, parse_ini, parse_yaml

INI = """
# production
[web]
web1 ansible_host=10.0.0.1 ansible_user=deploy ansible_port=2222
web2.example.com

[db]
db1

[prod:children]
web
db

[web:vars]
http_port=80
"""

YAML = """
all:
  children:
    web:
      hosts:
        web1:
          ansible_host: 10.0.0.1
          ansible_user: deploy
        web2.example.com:
    db:
      hosts:
        db1: {}
"""


def names(hosts):
    return [(h.name, h.destination, h.port) for h in hosts]


def test_ini_groups_children_and_vars():
    assert names(parse_ini(INI, "web")) == [
        ("web1", "deploy@10.0.0.1", 2222), ("web2.example.com", "web2.example.com", None)]
    assert [h.name for h in parse_ini(INI, "prod")] == ["web1", "web2.example.com", "db1"]
    assert {h.name for h in parse_ini(INI, "all")} == {"web1", "web2.example.com", "db1"}


def test_yaml_groups():
    assert names(parse_yaml(YAML, "web")) == [
        ("web1", "deploy@10.0.0.1", None), ("web2.example.com", "web2.example.com", None)]
    assert [h.name for h in parse_yaml(YAML, "all")] == ["web1", "web2.example.com", "db1"]


@pytest.mark.parametrize("text", ["[web]\nweb[01:10]\n", "[web]\nweb1 ansible_host\n",
                                  "[web]\nweb1 ansible_host=$(reboot)\n"])
def test_ini_refuses_what_it_cannot_honour(text):
    with pytest.raises(InventoryError):
        parse_ini(text, "web")


def test_unknown_group():
    with pytest.raises(InventoryError, match="no group 'api'"):
        parse_ini(INI, "api")
