"""What makes two requests the same (exact key) or comparable (scope)."""

from __future__ import annotations

from proxy.keys import CHAT, COMPLETIONS, namespace_of, request_keys


def chat(content: str = "What is the capital of France?", **kw):
    return {"model": "auto", "messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": content}], **kw}


def test_stream_and_max_tokens_do_not_change_the_key() -> None:
    base = request_keys("ns", CHAT, "auto", chat())
    for variant in (chat(stream=True), chat(stream_options={"include_usage": True}),
                    chat(max_tokens=50), chat(user="u1")):
        assert request_keys("ns", CHAT, "auto", variant).exact == base.exact


def test_everything_that_shapes_the_answer_changes_the_key() -> None:
    base = request_keys("ns", CHAT, "auto", chat()).exact
    variants = [chat(temperature=0.5), chat(top_p=0.9), chat(n=2), chat(seed=1),
                chat(tools=[{"type": "function", "function": {"name": "f"}}]),
                chat(response_format={"type": "json_object"}), chat(guided_json={"a": 1}),
                chat("What is the capital of Spain?")]
    keys = {request_keys("ns", CHAT, "auto", v).exact for v in variants}
    assert base not in keys and len(keys) == len(variants)
    assert request_keys("ns2", CHAT, "auto", chat()).exact != base
    assert request_keys("ns", CHAT, "large-70b", chat()).exact != base
    assert request_keys("ns", COMPLETIONS, "auto", {"model": "auto", "prompt": "x"}).exact != base


def test_scope_is_everything_but_the_last_user_message() -> None:
    a = request_keys("ns", CHAT, "auto", chat("How do I reset my password?"))
    b = request_keys("ns", CHAT, "auto", chat("I forgot my password, help"))
    assert a.scope == b.scope and a.exact != b.exact
    assert a.query_text == "How do I reset my password?"
    other_system = chat("How do I reset my password?")
    other_system["messages"][0]["content"] = "Be verbose."
    assert request_keys("ns", CHAT, "auto", other_system).scope != a.scope
    assert request_keys("other", CHAT, "auto", chat("How do I reset my password?")).scope != \
        a.scope


def test_query_text_only_for_a_final_user_text() -> None:
    body = chat()
    body["messages"].append({"role": "assistant", "content": "Paris."})
    assert request_keys("ns", CHAT, "auto", body).query_text == ""
    parts = chat()
    parts["messages"][-1]["content"] = [{"type": "text", "text": "hello"},
                                        {"type": "text", "text": "world"}]
    assert request_keys("ns", CHAT, "auto", parts).query_text == "hello\nworld"
    image = chat()
    image["messages"][-1]["content"] = [{"type": "image_url", "image_url": {"url": "x"}}]
    assert request_keys("ns", CHAT, "auto", image).query_text == ""


def test_namespace_hides_the_api_key() -> None:
    ns = namespace_of(None, "Bearer sk-secret-123")
    assert "sk-secret" not in ns and ns.startswith("key:")
    assert ns != namespace_of(None, "Bearer sk-other")
    # the header only partitions within the caller's own namespace...
    assert namespace_of("team-a", "Bearer sk-secret-123") == ns + "/ns:team-a"
    assert namespace_of("team-a", None) == "anon/ns:team-a"
    # ...unless a gateway that sets it is trusted to name the tenant
    assert namespace_of("team-a", "Bearer sk-secret-123", trust_header=True) == "ns:team-a"
    assert namespace_of(None, None) == "anon" == namespace_of(None, "Bearer ")
