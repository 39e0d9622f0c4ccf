"""The server with pictures: a vision-language model sees data-URL pictures in chat requests (as the
engine does), and a text model refuses them by name."""

import base64
import io

import httpx
import openai
from conftest import LiveServer, error_of

from tinylm.infer.sampling import SamplingSettings
from tinylm.serve.app import build_server

# -- pictures --------------------------------------------------------------------------------------


def png_url(color):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_a_vision_language_model_sees_data_url_pictures(tmp_path):
    from tests.test_vlm_training import tiny_vlm_dir
    from tinylm.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(
        ["What colour is the shape? It is red.", "这个图形是什么颜色的？它是红色的。"] * 20, vocab_size=300
    )
    model_dir = tiny_vlm_dir(tmp_path / "vlm", tokenizer)
    with LiveServer(build_server(model_dir, max_batch=4)) as live:
        assert httpx.get(live.url + "/v1/models").json()["data"][0]["vision"] is True
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
        answers = {}
        for color in ["red", "blue"]:
            messages = [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": png_url(color)}},
                        {"type": "text", "text": "What colour is the shape?"},
                    ],
                }
            ]
            out = client.chat.completions.create(
                model="vlm", messages=messages, temperature=0, max_tokens=12, logprobs=True
            )
            answers[color] = out.choices[0].logprobs.content[0].logprob
            # the engine alone, with the same picture, says the same
            server = live.server
            from tinylm.image_processor import load_image

            picture = load_image(base64.b64decode(png_url(color).split(",")[1]))
            prompt = server.chat_format.render([{"role": "user", "content": "<image>\nWhat colour is the shape?"}])
            settings = server.chat_format.settings(
                SamplingSettings(max_new_tokens=12, temperature=0), server.engine.tokenizer
            )
            assert (
                out.choices[0].message.content
                == server.engine.run([prompt], settings, images=[[picture]])[0].text.lstrip()
            )
        assert answers["red"] != answers["blue"]  # the picture reached the model
        bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]
        assert error_of(httpx.post(live.url + "/v1/chat/completions", json={"messages": bad}), 400)["param"].endswith(
            "image_url.url"
        )
        broken = [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}
        ]
        assert (
            "not a readable image"
            in error_of(httpx.post(live.url + "/v1/chat/completions", json={"messages": broken}), 400)["message"]
        )
        tag = [{"role": "user", "content": "<image> what?"}]
        error_of(httpx.post(live.url + "/v1/chat/completions", json={"messages": tag}), 400)
        image_token = live.server.engine.vlm.config.image_token_id
        assert (
            "image token"
            in error_of(httpx.post(live.url + "/v1/completions", json={"prompt": [5, image_token, 6]}), 400)["message"]
        )
        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (5000, 5000), "red").save(buffer, format="PNG")  # small on the wire, 75 MB decoded
        huge = [
            {
                "role": "user",
                "content": [
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()},
                    }
                ],
            }
        ]
        assert (
            "5000x5000"
            in error_of(httpx.post(live.url + "/v1/chat/completions", json={"messages": huge}), 400)["message"]
        )


def test_a_text_model_refuses_pictures(live):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url("red")}}]}]
    assert (
        "no vision tower"
        in error_of(httpx.post(live.url + "/v1/chat/completions", json={"messages": messages}), 400)["message"]
    )
