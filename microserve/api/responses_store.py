"""The responses kept for `previous_response_id`: each one's whole conversation, so that a
follow-up continues it; bounded in count and in size, least recently used evicted first."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from microserve.api.protocol import ChatMessage
from microserve.errors import UserError

MAX_STORED_RESPONSES = 1024  # responses kept per front process
MAX_STORED_CHARS = 64 * 1024 * 1024  # their conversations' total size (characters of JSON)


class InvalidPreviousResponse(UserError):
    """`previous_response_id` names no stored response (never stored, or evicted)."""

    param = "previous_response_id"
    code = "previous_response_not_found"


@dataclass(frozen=True)
class StoredResponse:
    conversation: tuple[ChatMessage, ...]  # input (instructions aside) and output, function calls included
    chars: int


class ResponseStore:
    """Stored responses' conversations for `previous_response_id`: an LRU bounded both in
    responses and in total size; one per front process."""

    def __init__(self, max_responses: int = MAX_STORED_RESPONSES, max_chars: int = MAX_STORED_CHARS):
        if max_responses < 1 or max_chars < 1:
            raise ValueError("a response store keeps at least one response of at least one character")
        self.max_responses = max_responses
        self.max_chars = max_chars
        self.chars = 0
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, response_id: str) -> bool:
        return response_id in self._entries

    def conversation(self, response_id: str) -> list[ChatMessage]:
        """A copy of the stored conversation (now the most recently used)."""
        entry = self._entries.get(response_id)
        if entry is None:
            raise InvalidPreviousResponse(f"Previous response with id {response_id!r} not found: never stored, "
                                          "stored with store=false, or evicted")
        self._entries.move_to_end(response_id)
        return [m.model_copy(deep=True) for m in entry.conversation]

    def put(self, response_id: str, conversation: list[ChatMessage]) -> bool:
        """Keep a conversation, evicting the least recently used; False if it alone is too big."""
        chars = sum(len(m.model_dump_json()) for m in conversation)
        if chars > self.max_chars:
            return False
        self._drop(response_id)
        self._entries[response_id] = StoredResponse(tuple(conversation), chars)
        self.chars += chars
        while len(self._entries) > self.max_responses or self.chars > self.max_chars:
            self._drop(next(iter(self._entries)))
        return True

    def _drop(self, response_id: str) -> None:
        entry = self._entries.pop(response_id, None)
        if entry is not None:
            self.chars -= entry.chars
