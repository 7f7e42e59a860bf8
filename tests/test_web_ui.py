"""The chat page of ``qwen2vl serve`` (qwen2vl.server.webui and qwen2vl/server/static), in a real browser:
headless Chromium (Debian's ``chromium``; never Playwright's own download) driven by Playwright for Python, against
real ``qwen2vl serve`` processes on the tiny fixture checkpoint. Answers the tiny model cannot write (grounding
boxes, HTML in the output, tool calls) come from a scripted /v1/chat/completions stream the test puts in place of
the server's (Playwright's request routing); everything else goes to the server.

The tests skip when Playwright or Chromium is missing, except under CI (env CI set), where they fail. Screenshots
of the main states go to $QWEN2VL_WEB_SCREENSHOTS (default: a temporary folder); the folder is printed."""

import json
import os
import re
import time

from tests.server_common import blocky, metrics, png_bytes, raw, wait_idle, write_video
from tests.web_common import (KEY, MODEL, Page, aborts, drop, expect, paste, png_file, script, settings,
                              street_png)
from tests.web_common import browser, chat, key_server, server, shots  # noqa: F401 (fixtures)


# ------------------------------------------------------------------------------------------------ server side


def test_routes_and_config(server):
    status, headers, body = raw(server, "GET", "/", key=None)
    assert status == 200 and headers["content-type"].startswith("text/html") and "static/app.js" in body
    assert "default-src 'none'" in headers["content-security-policy"] and "script-src 'self'" in \
        headers["content-security-policy"]
    status, headers, body = raw(server, "GET", "/static/markdown.js", key=None)
    assert status == 200 and headers["content-type"].startswith("text/javascript")
    for bad in ("/static/..%2Fwebui.py", "/static/webui.py", "/static/nothing.js"):
        status, _, body = raw(server, "GET", bad, key=None)
        assert status == 404 and "error" in body, bad
    status, _, body = raw(server, "GET", "/webui/config.json", key=None)
    assert status == 200 and body["api_key_required"] is False
    assert body["limits"]["max_images_per_request"] == 3 and body["limits"]["max_request_bytes"] == 3 << 20
    assert body["limits"]["max_image_pixels"] == 50_000_000


def test_no_web_ui_flag(tiny_checkpoint):
    from qwen2vl import LLM
    from qwen2vl.cli import build_parser
    from qwen2vl.server import ServerConfig, build_app
    assert build_parser().parse_args(["serve", "--model", "m"]).web_ui is True
    assert build_parser().parse_args(["serve", "--model", "m", "--no-web-ui"]).web_ui is False
    llm = LLM(str(tiny_checkpoint), dtype="float32", device="cpu", max_num_seqs=1)
    paths = {on: {r.path for r in build_app(llm, ServerConfig(served_model_names=["m"], web_ui=on)).routes}
             for on in (True, False)}
    assert {"/", "/static/{name}", "/webui/config.json"} <= paths[True]
    assert not paths[False] & {"/", "/static/{name}", "/webui/config.json"}
    assert "/v1/chat/completions" in paths[False]


# ------------------------------------------------------------------------------------------------ in the browser


def test_attach_stream_two_turns_and_persist(chat, server, shots):
    page = chat.open()
    assert page.text_content("#model-name") == MODEL
    settings(page, temperature=0, max_tokens=12)
    page.set_input_files("#file-input", files=[png_file("picked.png")])
    paste(page, "pasted.png", png_bytes(blocky(40, 40, 2)))
    page.wait_for_selector("#attachments figure:nth-child(2)")
    assert page.locator("#attachments figcaption").all_text_contents() == [
        f"picked.png · {len(png_file('picked.png')['buffer'])} B", f"pasted.png · {len(png_bytes(blocky(40, 40, 2)))} B"]
    page.screenshot(path=os.path.join(shots, "attachments.png"))
    page.evaluate("""() => {  // the answer's text as each change shows it
        window.__seen = [];
        new MutationObserver(() => {
            const md = document.querySelector(".msg.assistant .md");
            if (md) window.__seen.push(md.textContent.length);
        }).observe(document.getElementById("messages"), {childList: true, subtree: true, characterData: true});
    }""")
    page.fill("#prompt", "What is in these pictures?")
    page.press("#prompt", "Enter")
    answer = chat.answer()
    assert answer.get_attribute("data-state") == "done"
    assert int(answer.get_attribute("data-deltas")) >= 3
    seen = page.evaluate("window.__seen")
    assert len(set(seen)) >= 3, seen  # the answer was shown as it came, token by token
    sent = chat.requests[0]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True} and sent["model"] == MODEL
    assert sent["temperature"] == 0 and sent["max_tokens"] == 12
    content = sent["messages"][0]["content"]
    assert [c["type"] for c in content] == ["image_url", "image_url", "text"]
    assert content[0]["image_url"]["url"].startswith("data:image/png;base64,")
    stats = answer.locator(".stats").text_content()
    assert re.fullmatch(r"TTFT \d+\.\d\d s · \d+\.\d tok/s · prompt \d+ \(cached \d+\) · completion 12 · "
                        r"finish: length", stats), stats
    answer.get_by_role("button", name="Copy this answer").click()
    first = page.evaluate("navigator.clipboard.readText()")
    assert first.strip()  # the raw answer: the next request sends the same text back (below)
    # the second turn sends the history
    page.fill("#prompt", "And now?")
    with page.expect_request("**/v1/chat/completions"):  # the second request, and its own answer (not the first)
        page.click("#send")
    page.locator(".msg.assistant").nth(1).wait_for()
    chat.answer()
    second = chat.requests[1]["messages"]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[0] == sent["messages"][0] and second[1]["content"] == first
    assert second[2]["content"] == [{"type": "text", "text": "And now?"}]
    assert page.locator(".msg").count() == 4
    page.screenshot(path=os.path.join(shots, "two-turns.png"))
    # regenerate: the last answer again, greedy so the same text
    last = chat.answer().locator(".md").text_content()
    with page.expect_request("**/v1/chat/completions"):
        chat.answer().get_by_role("button", name="Regenerate this answer").click()
    assert chat.answer().locator(".md").text_content() == last
    assert chat.requests[2]["messages"] == second and page.locator(".msg").count() == 4
    # kept across a reload; deletable
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    item = page.locator("#conversations li")
    assert item.count() == 1 and item.locator(".open").text_content() == "What is in these pictures?"
    item.locator(".open").click()
    assert page.locator(".msg").count() == 4 and page.locator(".msg.user .thumbs img").count() == 2
    page.get_by_role("button", name="Delete conversation What is in these pictures?").click()
    expect(page.locator("#conversations li")).to_have_count(0)
    assert page.locator(".msg").count() == 0
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.locator("#conversations li").count() == 0
    assert chat.errors == []


def test_drop_a_video_and_an_image(chat, server, tmp_path):
    page = chat.open()
    settings(page, max_tokens=4, max_pixels=3136)
    video = write_video(tmp_path / "clip.mp4").read_bytes()
    drop(page, [("clip.mp4", video, "video/mp4"), ("dot.png", png_bytes(blocky(32, 32, 3)), "image/png")])
    expect(page.locator("#attachments figure")).to_have_count(2)
    assert page.locator("#attachments video").get_attribute("aria-label") == "clip.mp4"
    page.fill("#prompt", "What happens?")
    page.press("#prompt", "Enter")
    assert chat.answer().get_attribute("data-state") == "done"
    content = chat.requests[0]["messages"][0]["content"]
    assert [c["type"] for c in content] == ["video_url", "image_url", "text"]
    assert content[0]["video_url"]["url"].startswith("data:video/mp4;base64,")
    assert chat.requests[0]["mm_processor_kwargs"] == {"max_pixels": 3136}
    assert page.locator(".msg.user video").count() == 1
    assert chat.errors == []


def test_stop_frees_the_slot(chat, server, shots):
    page = chat.open()
    settings(page, max_tokens=3000)
    before = aborts(server)
    page.fill("#prompt", "Tell me a long story")
    page.press("#prompt", "Enter")
    expect(page.locator(".msg.assistant")).to_have_attribute("data-deltas", re.compile(r"^([5-9]|\d\d+)$"))
    assert metrics(server)["qwen2vl_requests_running"] == 1
    assert page.is_visible("#stop") and not page.is_visible("#send")
    page.keyboard.press("Escape")
    answer = chat.answer(timeout=10000)
    assert answer.get_attribute("data-state") == "stopped" and "Stopped." in answer.text_content()
    m = wait_idle(server)  # nothing running, no cache row held
    assert m["qwen2vl_requests_running"] == 0 and m["qwen2vl_kv_cache_rows"] == 0
    deadline = time.monotonic() + 10
    while aborts(server) < before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert aborts(server) == before + 1
    assert page.is_visible("#send") and not page.is_visible("#stop")
    page.screenshot(path=os.path.join(shots, "stopped.png"))
    # the Stop button does the same; New chat empties the page
    page.fill("#prompt", "Again")
    page.click("#send")
    page.wait_for_selector("#stop:not([hidden])")
    page.click("#stop")
    assert chat.answer(timeout=10000).get_attribute("data-state") == "stopped"
    wait_idle(server)
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    assert chat.errors == []


def test_grounding_box_drawn_on_the_image(chat, shots):
    page = chat.open()
    script(page, {"role": "assistant", "content": ""}, {"content": "There is "},
           {"content": "<|object_ref_start|>a red car<|object_ref_end|><|box_start|>(100,200)"},
           {"content": ",(500,800)<|box_end|> and "},
           {"content": "<|object_ref_start|>a tree<|object_ref_end|><|box_start|>(600,50),(950,400)<|box_end|>."})
    page.set_input_files("#file-input", files=[{"name": "street.png", "mimeType": "image/png",
                                                "buffer": street_png()}])
    page.fill("#prompt", "Find the car")
    page.press("#prompt", "Enter")
    answer = chat.answer()
    assert answer.locator(".md").text_content() == "There is a red car and a tree."
    assert answer.locator(".ref").all_text_contents() == ["a red car", "a tree"]
    img = answer.locator(".ground img")
    expect(img).to_have_js_property("complete", True)
    im = img.bounding_box()
    assert im["width"] > 100 and abs(im["width"] / im["height"] - 320 / 200) < 0.02
    boxes = answer.locator(".ground .box")
    assert boxes.count() == 2
    for i, (x1, y1, x2, y2) in enumerate([(100, 200, 500, 800), (600, 50, 950, 400)]):
        b = boxes.nth(i).bounding_box()
        assert abs(b["x"] - (im["x"] + im["width"] * x1 / 1000)) < 1.5
        assert abs(b["y"] - (im["y"] + im["height"] * y1 / 1000)) < 1.5
        assert abs(b["width"] - im["width"] * (x2 - x1) / 1000) < 1.5
        assert abs(b["height"] - im["height"] * (y2 - y1) / 1000) < 1.5
    assert boxes.locator(".box-label").all_text_contents() == ["a red car", "a tree"]
    stats = answer.locator(".stats").text_content()
    assert "prompt 30 (cached 16)" in stats and "completion 5" in stats
    page.screenshot(path=os.path.join(shots, "grounding.png"))
    assert chat.errors == []


HOSTILE = '<script>window.__pwned = 1</script> <img src=x onerror="window.__pwned = 2"> [x](javascript:alert(1))'


def test_output_and_file_names_render_as_text(chat, shots):
    page = chat.open()
    md = ("# Title\n\nSome `inline <b>code</b>` and **bold**.\n\n- one\n- two\n  - nested\n\n1. first\n2. second\n\n"
          "```python\nprint('<i>hi</i>')\n```\n\n| a | b |\n|---|:-:|\n| <u>1</u> | 2 |\n\n")
    script(page, {"content": md}, {"content": HOSTILE})
    name = '<img src=x onerror="window.__pwned=3">.png'
    page.set_input_files("#file-input", files=[png_file(name)])
    page.wait_for_selector("#attachments figure")
    page.fill("#prompt", "<script>window.__pwned = 4</script>")
    page.press("#prompt", "Enter")
    answer = chat.answer()
    body = answer.locator(".md")
    assert body.locator("h1").text_content() == "Title"
    assert body.locator("code").first.text_content() == "inline <b>code</b>"
    assert body.locator("strong").text_content() == "bold"
    assert page.locator(".msg.assistant .md > ul > li").count() == 2 and body.locator("ul ul li").text_content() == "nested"
    assert body.locator("ol > li").all_text_contents() == ["first", "second"]
    assert body.locator("pre[data-lang=python] code").text_content() == "print('<i>hi</i>')"
    assert body.locator("th").all_text_contents() == ["a", "b"]
    assert body.locator("td").all_text_contents() == ["<u>1</u>", "2"]
    assert HOSTILE.replace("[x](javascript:alert(1))", "[x](javascript:alert(1))") in body.text_content()
    for tag in ("script", "img", "b", "i", "u", "a"):
        assert body.locator(tag).count() == 0, tag
    user = page.locator(".msg.user")
    assert user.locator(".text").text_content() == "<script>window.__pwned = 4</script>"
    assert user.locator("figcaption").text_content().startswith(name)
    assert page.locator(".msg.user img").count() == 1  # the thumbnail only
    assert page.evaluate("window.__pwned") is None
    page.screenshot(path=os.path.join(shots, "markdown-and-escaping.png"), full_page=True)
    assert chat.errors == []


def test_markdown_renderer(chat):
    """markdown.js directly (imported into the page): streaming halves, grounding in code, links, escaping."""
    page = chat.open()
    render = """async ([text, partial]) => {
        const md = await import("./static/markdown.js");
        const {node, boxes} = md.renderAnswer(text, partial);
        return {html: node.innerHTML, text: node.textContent, boxes, plain: md.plainText(text)};
    }"""
    ref = "<|object_ref_start|>cat<|object_ref_end|>"
    half = page.evaluate(render, ["A " + ref + "<|box_start|>(1,2),(3", True])
    assert half["text"] == "A cat" and half["boxes"] == []  # an unfinished box is not shown while streaming
    assert page.evaluate(render, ["A <|object_ref_st", True])["text"] == "A"
    done = page.evaluate(render, ["A " + ref + "<|box_start|>(1,2),(3,4)<|box_end|><|box_start|>(5,6),(7,8)"
                                  "<|box_end|> `" + ref + "`", False])
    assert [b["label"] for b in done["boxes"]] == ["cat", "cat"] and done["boxes"][1]["x1"] == 5
    assert done["text"] == "A catcat cat" and done["plain"] == "A catcat `cat`"
    links = page.evaluate(render, ["[ok](https://example.com/a) [no](javascript:alert(1)) http://x.org/b.", False])
    assert links["html"].count("<a ") == 2 and 'href="https://example.com/a"' in links["html"]
    assert 'href="http://x.org/b"' in links["html"] and "javascript:alert(1)" in links["text"]
    assert "href=\"javascript" not in links["html"]
    quoted = page.evaluate(render, ["> quote <b>\n\n---\n\n~~gone~~ *it* snake_case_name", False])
    assert "<blockquote><p>quote &lt;b&gt;</p></blockquote><hr>" in quoted["html"]
    assert "<del>gone</del> <em>it</em> snake_case_name" in quoted["html"]
    assert chat.errors == []


def test_tool_calls_shown_as_cards(chat, shots):
    page = chat.open()
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    settings(page, tools=json.dumps(tools))
    script(page, {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                  "function": {"name": "get_weather", "arguments": "{\"city\": "}}]},
           {"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]})
    page.fill("#prompt", "Weather in Paris?")
    page.press("#prompt", "Enter")
    card = chat.answer().locator(".tool-card")
    assert card.locator(".tool-name").text_content() == "get_weather"
    assert json.loads(card.locator("pre").text_content()) == {"city": "Paris"}
    assert chat.requests[0]["tools"] == tools
    page.screenshot(path=os.path.join(shots, "tool-call.png"))
    # the result goes back as a tool message, and the model answers it
    script(page, {"content": "It is sunny."})
    card.get_by_label("Result of get_weather").fill("sunny, 21 C")
    with page.expect_request("**/v1/chat/completions"):
        card.get_by_role("button", name="Send result").click()
    page.locator(".msg.assistant .md", has_text="It is sunny.").wait_for()
    assert chat.answer().locator(".md").text_content() == "It is sunny."
    sent = chat.requests[1]["messages"]
    assert sent[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}
    assert sent[2] == {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}
    settings(page, tools="not json")
    page.fill("#prompt", "again")
    page.press("#prompt", "Enter")
    expect(page.locator("#settings-error")).to_contain_text("The tools box does not hold JSON")
    assert len(chat.requests) == 2 and page.input_value("#prompt") == "again"  # nothing sent, the text kept
    assert chat.errors == []


def test_files_over_the_limits(chat):
    page = chat.open()
    assert page.get_attribute("#attach", "title").endswith(
        "this server takes at most 3 images, 2 videos, 3.0 MB in all per request")
    big = {"name": "huge.png", "mimeType": "image/png", "buffer": b"\x89PNG" + os.urandom(3 << 20)}
    page.set_input_files("#file-input", files=[big])
    error = page.locator("#attach-error")
    error.wait_for()
    assert re.search(r'"huge\.png" is 3\.0 MB: too big for this server, which takes requests of at most 3\.0 MB',
                     error.text_content())
    assert page.locator("#attachments figure").count() == 0
    page.set_input_files("#file-input", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hi"}])
    expect(error).to_contain_text('"notes.txt" is not an image or a video')
    page.set_input_files("#file-input", files=[png_file(f"p{i}.png", seed=i) for i in range(4)])
    expect(page.locator("#attachments figure")).to_have_count(3)
    assert '"p3.png" not added: this request would hold 4 images; the server takes at most 3' in error.text_content()
    page.fill("#prompt", "one")
    page.press("#prompt", "Shift+Enter")
    page.keyboard.type("two")
    assert page.input_value("#prompt") == "one\ntwo" and chat.requests == []  # a new line, nothing sent
    page.get_by_role("button", name="Remove p0.png").click()
    assert page.locator("#attachments figcaption").all_text_contents()[0].startswith("p1.png")
    assert chat.errors == []


def test_api_key_asked_once_and_kept(browser, key_server, shots):
    context = browser.new_context()
    chat = Page(context, key_server.url)
    page = chat.page
    page.goto(key_server.url + "/")
    dialog = page.locator("#key-dialog")
    dialog.wait_for()
    page.screenshot(path=os.path.join(shots, "api-key.png"))
    page.keyboard.press("Escape")
    assert dialog.is_visible()  # the key is needed: Esc does not dismiss the dialog
    page.fill("#key-input", "wrong")
    page.click("#key-save")
    expect(page.locator("#key-error")).to_have_text("incorrect API key")
    assert dialog.is_visible()
    page.fill("#key-input", KEY)
    page.click("#key-save")
    page.wait_for_selector("body[data-ready=true]")
    assert page.text_content("#model-name") == MODEL and not dialog.is_visible()
    settings(page, max_tokens=4)
    page.fill("#prompt", "Hi")
    page.press("#prompt", "Enter")
    assert chat.answer().get_attribute("data-state") == "done"
    page.reload()
    page.wait_for_selector("body[data-ready=true]")  # no dialog: the key is kept
    assert not dialog.is_visible() and page.text_content("#model-name") == MODEL
    assert page.evaluate("localStorage.getItem('qwen2vl.apiKey')") == KEY
    context.close()


def test_phone_screen_has_no_horizontal_scroll(browser, server, shots):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    chat = Page(context, server.url)
    page = chat.open()
    wide = "```\n" + "x" * 400 + "\n```\n\n| " + " | ".join(f"column{i}" for i in range(12)) + " |\n|" + \
        "---|" * 12 + "\n| " + " | ".join("v" * 9 for _ in range(12)) + " |\n\n" + "y" * 300
    script(page, {"content": wide + "\n<|object_ref_start|>a<|object_ref_end|><|box_start|>(0,0),(999,999)<|box_end|>"})
    page.set_input_files("#file-input", files=[png_file("wide.png", 1600, 300)])
    page.fill("#prompt", "z" * 300)
    page.press("#prompt", "Enter")
    chat.answer()
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    assert page.evaluate("document.getElementById('messages').scrollWidth <= "
                         "document.getElementById('messages').clientWidth")
    page.screenshot(path=os.path.join(shots, "phone.png"))
    assert not page.is_visible("#sidebar")
    page.click("#toggle-sidebar")
    assert page.is_visible("#sidebar") and page.locator("#conversations li").count() == 1
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.screenshot(path=os.path.join(shots, "phone-conversations.png"))
    page.get_by_role("button", name="Hide conversations").click()
    assert not page.is_visible("#sidebar")
    page.click("#toggle-sidebar")
    page.keyboard.press("Escape")
    assert not page.is_visible("#sidebar")
    assert chat.errors == []
    context.close()
