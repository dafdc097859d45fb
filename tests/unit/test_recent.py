"""The recent upstream events the status page lists: bounded, de-duplicated, newest first."""

from amqproxy.recent import RecentEvents


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def test_repeats_are_one_entry_with_a_count_and_move_to_the_top():
    clock = Clock()
    recent = RecentEvents(clock=clock)
    recent.add("failure", "n1:5672", "refused")
    clock.now += 1
    recent.add("recovery", "n2:5672", "answers again")
    clock.now += 1
    recent.add("failure", "n1:5672", "refused")
    clock.now += 0.5
    first, second = recent.snapshot()
    assert (first["kind"], first["node"], first["text"], first["count"]) == ("failure", "n1:5672", "refused", 2)
    assert first["first_at"] == 1_700_000_000.0 and first["at"] == 1_700_000_002.0 and first["age_s"] == 0.5
    assert (second["kind"], second["count"], second["age_s"]) == ("recovery", 1, 1.5)


def test_the_oldest_entries_go_first_and_an_empty_node_is_none():
    recent = RecentEvents(size=3, clock=Clock())
    for i in range(5):
        recent.add("failure", "", f"error {i}")
    assert [e["text"] for e in recent.snapshot()] == ["error 4", "error 3", "error 2"]
    assert all(e["node"] is None for e in recent.snapshot())
