"""The API's request bodies: field types, ranges and which extra fields each accepts.

Owns: the pydantic models of every JSON body (the OpenAI chat request allows unknown fields, as
OpenAI clients send some; every other body forbids them, so a typo is a 400, not ignored).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from chatloop.algorithms import Algorithm


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we do not use

    messages: list[dict[str, Any]]
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int | None = None
    user: str | None = None
    chatloop_conversation_id: str | None = None
    chatloop_adapter: str | None = None


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message_id: str
    rating: Literal[1, -1]
    reason: str | None = None
    comment: str | None = None
    user: str | None = None


class ComparisonRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message_a: str
    message_b: str
    choice: Literal["a", "b", "tie", "both_bad"]
    user: str | None = None


class RetrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    algo: Algorithm = Algorithm.DPO
    wait: bool = False


class ScheduleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["cron", "interval", "feedback"]
    spec: str = Field(max_length=200)  # crontab line | minutes | number of new feedback events
    algo: Algorithm = Algorithm.DPO


class OverrideRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=500)


class CompareRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str | None = Field(default=None, max_length=32)  # null stops the live comparison


class SqlRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sql: str
    max_rows: int | None = Field(default=None, ge=1)


class KeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=100)
    chat_per_minute: int | None = Field(default=None, ge=0, le=1_000_000)
    feedback_per_minute: int | None = Field(default=None, ge=0, le=1_000_000)
    max_pairs: int | None = Field(default=None, ge=0, le=1_000_000)
