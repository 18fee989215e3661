"""One sequence's output as text: incremental detokenization, stop strings, and what of it
has been sent (deltas)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class OutputText:
    text: str = ""
    sent_text: int = 0  # characters of `text` already in an output's delta
    sent_tokens: int = 0  # output tokens already in an output's delta
    prefix_offset: int = 0  # detokenizer window over the output ids
    read_offset: int = 0
    logprobs: list = field(default_factory=list)  # per output token: (logprob, [(id, logprob), ...])
    # per prompt token from the second on, the same (params.prompt_logprobs; the first sequence only)
    prompt_logprobs: list = field(default_factory=list)

    def detokenize(self, tokenizer, ids: list[int], skip_special: bool) -> None:
        """Decode a short window of the output ids `ids`, so multi-byte characters come out whole."""
        prefix = tokenizer.decode(ids[self.prefix_offset : self.read_offset], skip_special_tokens=skip_special)
        full = tokenizer.decode(ids[self.prefix_offset :], skip_special_tokens=skip_special)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(ids)

    def cut_at_stop(self, stop: list[str], keep_stop: bool) -> bool:
        """End the text at the first stop string (searched from shortly before what was sent); True if found."""
        search_from = max(0, self.sent_text - max(len(s) for s in stop))
        best = None
        for s in stop:
            i = self.text.find(s, search_from)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return False
        i, s = best
        self.text = self.text[: i + len(s)] if keep_stop else self.text[:i]
        return True

    def visible_len(self, finished: bool, stop: list[str]) -> int:
        """Hold back a tail that might still grow into a stop string, so none is sent partially."""
        if finished or not stop:
            return len(self.text)
        return max(self.sent_text, len(self.text) - (max(len(s) for s in stop) - 1))

    def take_delta(self, finished: bool, stop: list[str]) -> tuple[str, str]:
        """(the text visible now, the part of it not sent before), marking that part sent."""
        visible = self.visible_len(finished, stop)
        delta = self.text[self.sent_text : visible]
        self.sent_text = visible
        return self.text[:visible], delta
