"""Drive `clasp serve --vlm` with the official `openai` Python package, as a
user's client would: one chat completion with an image (a base64 data URL),
the same call streamed, and a seeded sampled call made twice.

    python3 scripts/openai_chat_check.py BASE_URL IMAGE

Prints one JSON object: the plain answer, the streamed answer (the chunks
joined), their finish reasons, usage, the number of chunks, and the two
seeded answers. Exits non-zero (with the reason) when the client fails or a
response is not the shape the client expects. scripts/get-py-clients.sh installs
the package into a cache outside the repository.
"""
import base64
import json
import sys

import openai


def main():
    base, image = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    url = "data:image/jpeg;base64," + base64.b64encode(open(image, "rb").read()).decode()
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "Describe the image."},
    ]}]
    plain = client.chat.completions.create(model="clasp", messages=messages,
                                           max_tokens=24, temperature=0)
    assert plain.object == "chat.completion", plain.object
    choice = plain.choices[0]
    assert choice.message.role == "assistant"
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens

    pieces, finish, usage, chunks = [], None, None, 0
    stream = client.chat.completions.create(model="clasp", messages=messages, max_tokens=24,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        chunks += 1
        assert chunk.object == "chat.completion.chunk", chunk.object
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason

    seeded = [client.chat.completions.create(model="clasp", messages=messages, max_tokens=16,
                                             temperature=0.9, top_p=0.95, seed=7
                                             ).choices[0].message.content for _ in range(2)]
    print(json.dumps({
        "plain": choice.message.content,
        "plain_finish": choice.finish_reason,
        "plain_usage": plain.usage.model_dump(),
        "streamed": "".join(pieces),
        "stream_finish": finish,
        "stream_usage": usage,
        "chunks": chunks,
        "seeded": seeded,
        "openai_version": openai.__version__,
    }))


if __name__ == "__main__":
    main()
