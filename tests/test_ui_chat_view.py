"""The Chat tab's rendering helpers: chatbot rows map to turns past hidden system turns, the
thumbs drawn are the shown replies' ratings, and the "reply 2 / 3" navigator."""

from __future__ import annotations

import pytest

from chatloop.conversations import assistant_turn
from ui.chat_view import alternatives_label, feedback_values, messages, turn_index


def reply(mid, rating=None):
    return {"message_id": mid, "content": f"text {mid}", "adapter": "base", "rating": rating,
            "reason": None, "comment": None}


TURNS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
         assistant_turn([reply("m1", -1), reply("m2", 1)], 0), {"role": "user", "content": "more"},
         assistant_turn([reply("m3")])]


def test_rows_skip_system_turns_and_refuse_anything_else():
    assert [m["role"] for m in messages(TURNS)] == ["user", "assistant", "user", "assistant"]
    assert turn_index(TURNS, 1) == 2 and turn_index(TURNS, [3, None]) == 4
    for bad in (4, -1, True, "1", None, 1.0, []):
        with pytest.raises(ValueError):
            turn_index(TURNS, bad)


def test_thumbs_follow_the_shown_alternative_and_the_navigator_only_the_last_reply():
    assert feedback_values(TURNS) == ["Dislike", None]
    assert alternatives_label(TURNS) is None  # the last reply has no alternatives
    last = TURNS[:3]
    assert alternatives_label(last) == "Reply **1 / 2** to your last message"
    assert alternatives_label([]) is None
