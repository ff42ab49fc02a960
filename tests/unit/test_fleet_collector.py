"""The fleet's series (a shared store): every host's heartbeat age, the hosts alive, the store's reach."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from whisperd.metrics import FleetCollector


@dataclass
class Host:
    id: str
    heartbeat_age_s: float


@dataclass
class Link:
    hosts: list[Host] = field(default_factory=list)
    reachable: bool = True


def scrape(link: Link, lease_s: float = 30.0) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    collectors = CollectorRegistry(auto_describe=False)
    collectors.register(FleetCollector(link, lease_s))
    body = generate_latest(collectors).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def test_every_host_in_the_store_has_its_heartbeat_age() -> None:
    got = scrape(Link([Host("a", 1.5), Host("b", 30.0), Host("c", 30.5)]))
    age = "whisperd_fleet_host_heartbeat_age_seconds"
    assert got[age, (("host", "a"),)] == 1.5
    assert got[age, (("host", "b"),)] == 30.0
    assert got[age, (("host", "c"),)] == 30.5
    assert got["whisperd_fleet_hosts", ()] == 2  # c is past the lease
    assert got["whisperd_store_reachable", ()] == 1


def test_the_lease_decides_which_hosts_count() -> None:
    assert scrape(Link([Host("a", 1.0), Host("b", 12.0)]), lease_s=10.0)["whisperd_fleet_hosts", ()] == 1


def test_an_unreachable_store_keeps_the_last_ages_read() -> None:
    got = scrape(Link([Host("a", 2.0)], reachable=False))
    assert got["whisperd_store_reachable", ()] == 0
    assert got["whisperd_fleet_host_heartbeat_age_seconds", (("host", "a"),)] == 2.0


def test_before_the_first_heartbeat_no_host_is_counted() -> None:
    got = scrape(Link())
    assert got["whisperd_fleet_hosts", ()] == 0
    assert not [key for key in got if key[0] == "whisperd_fleet_host_heartbeat_age_seconds"]
