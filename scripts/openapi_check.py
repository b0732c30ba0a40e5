"""Hold `clasp serve` to its own OpenAPI document: validate each request body below against the
schema that GET /openapi.json gives for its path (JSON Schema 2020-12, as OpenAPI 3.1 uses), send
it, and report both verdicts. A server that does what its schema says answers 200 exactly to the
bodies the schema accepts.

    python3 scripts/openapi_check.py BASE_URL IMAGE

IMAGE is a small image file, sent as base64 where a case needs one. Prints a JSON list of
{"path", "case", "valid", "status", "error"}. The cases are the ones schemathesis found where the
schema and the server disagreed, with accepted neighbours of each. scripts/get-py-clients.sh installs
`jsonschema` (and `openai`).
"""
import base64
import json
import sys
import urllib.error
import urllib.request

import jsonschema

base, image = sys.argv[1], sys.argv[2]
img = base64.b64encode(open(image, "rb").read()).decode()

CASES = [
    ("/v1/embeddings", "empty object", {}),
    ("/v1/embeddings", "empty input and images", {"input": [], "images": []}),
    ("/v1/embeddings", "model is an object", {"input": "a dog", "model": {}}),
    ("/v1/embeddings", "model is a number", {"input": "a dog", "model": 3}),
    ("/v1/embeddings", "a text and a model name", {"input": "a dog", "model": "clasp"}),
    ("/v1/embeddings", "texts, no images", {"input": ["a dog"], "images": []}),
    ("/v1/embeddings", "an image only", {"images": [img]}),
    ("/v1/embeddings", "dimensions 0", {"input": "a dog", "dimensions": 0}),
    ("/v1/similarity", "empty images and texts", {"images": [], "texts": []}),
    ("/v1/similarity", "no texts", {"images": [img], "texts": []}),
    ("/v1/similarity", "an image and a text", {"images": [img], "texts": ["a dog"]}),
    ("/v1/classify", "empty labels", {"images": [img], "labels": []}),
    ("/v1/classify", "one label", {"images": [img], "labels": ["dog"]}),
    ("/v1/classify", "two labels", {"images": [img], "labels": ["dog", "cat"]}),
    ("/v1/classify", "no images", {"images": [], "labels": ["dog", "cat"]}),
    ("/v1/search", "empty object", {}),
    ("/v1/search", "empty query", {"query": ""}),
    ("/v1/search", "blank query", {"query": "   "}),
    ("/v1/search", "a query", {"query": "a red square"}),
    ("/v1/search", "algebra", {"query": "\"a red square\" + 2:sky", "k": 2}),
    ("/v1/search", "an image", {"image": img}),
    ("/v1/search", "k 0", {"query": "a dog", "k": 0}),
]

doc = json.load(urllib.request.urlopen(base + "/openapi.json"))
out = []
for path, case, body in CASES:
    schema = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    try:
        jsonschema.Draft202012Validator(schema).validate(body)
        valid, why = True, None
    except jsonschema.ValidationError as e:
        valid, why = False, e.message
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        status, error = urllib.request.urlopen(req).status, None
    except urllib.error.HTTPError as e:
        status, error = e.code, json.load(e).get("error", {}).get("message")
    out.append({"path": path, "case": case, "valid": valid, "why": why, "status": status,
                "error": error})
print(json.dumps(out))
