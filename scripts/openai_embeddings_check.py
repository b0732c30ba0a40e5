"""Call `clasp serve`'s embeddings endpoint with the official `openai` Python package and its
defaults (it asks for `encoding_format: "base64"` and decodes the vectors), then with
`dimensions=8`.

    python3 scripts/openai_embeddings_check.py BASE_URL

Prints {"default": [[...], ...], "dims8": [[...], ...], "prompt_tokens": N} for the texts
"a dog" and "a photo of a cat on a sofa". scripts/get-py-clients.sh installs the package.
"""
import json
import sys

import openai

client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused", max_retries=0)
texts = ["a dog", "a photo of a cat on a sofa"]
full = client.embeddings.create(model="clasp", input=texts)
short = client.embeddings.create(model="clasp", input=texts, dimensions=8)
print(json.dumps({
    "default": [d.embedding for d in full.data],
    "dims8": [d.embedding for d in short.data],
    "prompt_tokens": full.usage.prompt_tokens,
}))
