"""Multi-turn conversation from Python: keeps the history, the images and (through the model)
the KV cache, so each turn prefills only what is new."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence

from vlm.errors import VlmError
from vlm.generation import GenerationResult, TextStream
from vlm.image import ImageInput, image_list
from vlm.models import ProcessedImage
from vlm.runtime import Model


class Chat:
    """A conversation with one model.

        chat = vlm.Chat(model, system="Be brief.")
        print(chat.send("Describe this.", images=["cat.jpg"]).text)
        print(chat.send("What colour is it?").text)   # the image is not encoded again
    """

    def __init__(self, model: Model, system: str | None = None, **generate_options):
        self.model = model
        self.system = system
        self.options = generate_options
        self.turns: list[tuple[dict, dict | None]] = []  # (user message, assistant reply)
        self.images: list[list[ProcessedImage]] = []  # each turn's images, preprocessed once per chat
        self.image_sources: list[list[ImageInput]] = []  # each turn's images as given (for `save`)
        self.dropped_turns = 0  # oldest turns dropped to fit the context, in total

    def messages(self, pending: dict | None = None) -> list[dict]:
        out = [{"role": "system", "content": self.system}] if self.system else []
        for user, reply in self.turns:
            out.append(user)
            if reply is not None:
                out.append(reply)
        return out + ([pending] if pending else [])

    def _all_images(self, extra: Sequence[ProcessedImage] = ()) -> list[ProcessedImage]:
        return [im for turn in self.images for im in turn] + list(extra)

    def _user_message(self, text: str, n_images: int) -> dict:
        if not n_images:
            return {"role": "user", "content": text}
        return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}

    def _fit(self, pending: dict, images: Sequence[ProcessedImage], max_new_tokens: int) -> None:
        """Drop the oldest turns until the prompt and a reply of max_new_tokens fit the context."""
        budget = self.model.context - min(max_new_tokens, self.model.context // 2)
        while True:
            segments, _ = self.model.segments(self.messages(pending), self._all_images(images))
            n = sum(len(s) for s in segments)
            if n <= budget:
                return
            if not self.turns:
                raise VlmError(f"this message alone is {n} tokens; the context holds {self.model.context}")
            self.turns.pop(0)
            self.images.pop(0)
            self.image_sources.pop(0)
            self.dropped_turns += 1

    def send(self, text: str, images: Sequence[ImageInput] | None = None, stream: bool = False,
             **options) -> GenerationResult | TextStream:
        """Add a user turn and generate the reply (streamed with stream=True)."""
        sources = image_list(images)
        opts = {"max_new_tokens": 512, **self.options, **options}
        family = self.model.family
        image_options = {k: opts.pop(k) for k in list(opts) if family and k in family.image_options}
        processed = [self.model.preprocess(im, **image_options) for im in sources]
        pending = self._user_message(text, len(processed))
        self._fit(pending, processed, opts["max_new_tokens"])
        out = self.model.generate(self.messages(pending), images=self._all_images(processed), stream=stream, **opts)
        self.turns.append((pending, None))
        self.images.append(processed)
        self.image_sources.append(sources)
        if not stream:
            self._record(out)
            return out
        return TextStream(self._recording(out), out.result)

    def _recording(self, stream: TextStream) -> Iterator[str]:
        try:
            yield from stream
        finally:  # an interrupted answer is kept as far as it got
            self._record(stream.result)

    def _record(self, result: GenerationResult) -> None:
        user, _ = self.turns[-1]
        self.turns[-1] = (user, {"role": "assistant", "content": result.text})

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.turns.clear()
        self.images.clear()
        self.image_sources.clear()
        self.model.reset()

    def save(self, path: str | os.PathLike) -> None:
        """Write the transcript as JSON (messages plus the image paths of each turn)."""
        images = [[im if isinstance(im, str) else f"<{type(im).__name__}>" for im in turn]
                  for turn in self.image_sources]
        data = {"system": self.system, "messages": self.messages(), "images": images}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=1)
