//! `POST /v1/responses` (OpenAI's Responses API) against the real server: each answer is
//! checked against the chat completion of the same conversation (the bridge must not change
//! what the model says), the stream against the non-streamed response, and the event order
//! against the Responses API's documented sequence.

mod common;

use common::{assert_refused, parse_sse, post, Server};
use serde_json::{json, Value};

/// The events of a Responses stream: (event name, data).
fn events(body: &str) -> Vec<(String, Value)> {
    parse_sse(body)
        .into_iter()
        .map(|(name, data)| {
            let v: Value = serde_json::from_str(&data).expect("event data is JSON");
            let name = name.expect("every Responses event is named");
            assert_eq!(v["type"], name.as_str(), "type field equals the event name");
            (name, v)
        })
        .collect()
}

#[tokio::test]
async fn text_answers_equal_the_chat_answer_plain_and_streamed() {
    let s = Server::start();
    let chat = post(
        &s,
        "/v1/chat/completions",
        json!({"model": "local", "max_tokens": 12, "temperature": 0, "ignore_eos": true,
               "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]}),
        &[],
    )
    .await
    .json();
    let want = chat["choices"][0]["message"]["content"]
        .as_str()
        .expect("text")
        .to_string();
    let req = json!({"model": "local", "instructions": "be brief", "max_output_tokens": 12, "temperature": 0,
                     "ignore_eos": true, "input": [{"role": "user", "content": [{"type": "input_text", "text": "hello there"}]}],
                     "metadata": {"k": "v"}});
    let r = post(&s, "/v1/responses", req.clone(), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-switchyard-tier"), "local");
    let v = r.json();
    assert_eq!(v["object"], "response");
    assert!(v["id"].as_str().is_some_and(|i| i.starts_with("resp_")));
    assert_eq!(
        v["status"], "incomplete",
        "12 tokens with eos ignored hit the limit"
    );
    assert_eq!(v["incomplete_details"]["reason"], "max_output_tokens");
    assert_eq!(v["output"][0]["type"], "message");
    assert_eq!(v["output"][0]["content"][0]["type"], "output_text");
    assert_eq!(v["output"][0]["content"][0]["text"], want.as_str());
    assert_eq!(v["usage"]["input_tokens"], chat["usage"]["prompt_tokens"]);
    assert_eq!(v["usage"]["output_tokens"], 12);
    assert_eq!(v["metadata"], json!({"k": "v"}));
    assert_eq!(v["instructions"], "be brief");

    // Streamed: the documented order, deltas that add up, and the same final object.
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let r = post(&s, "/v1/responses", sreq, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let evs = events(&r.text);
    let names: Vec<&str> = evs.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        &names[..4],
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added"
        ]
    );
    assert_eq!(
        &names[names.len() - 4..],
        [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.incomplete"
        ]
    );
    let seqs: Vec<u64> = evs
        .iter()
        .map(|e| e.1["sequence_number"].as_u64().expect("seq"))
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    let text: String = evs
        .iter()
        .filter(|e| e.0 == "response.output_text.delta")
        .map(|e| e.1["delta"].as_str().expect("delta"))
        .collect();
    assert_eq!(text, want);
    let last = &evs.last().expect("events").1["response"];
    assert_eq!(last["output"][0]["content"][0]["text"], want.as_str());
    assert_eq!(last["usage"]["output_tokens"], 12);
    assert_eq!(last["id"], evs[0].1["response"]["id"]);
}

#[tokio::test]
async fn function_calls_and_their_outputs() {
    let s = Server::start();
    let tool = json!({"type": "function", "name": "get_weather", "description": "weather for a city",
                      "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                                     "required": ["city", "days"], "additionalProperties": false}});
    let req = json!({"model": "local", "max_output_tokens": 150, "temperature": 0, "tools": [tool],
                     "tool_choice": "required", "input": "weather in Paris?"});
    let v = post(&s, "/v1/responses", req.clone(), &[]).await.json();
    let call = v["output"]
        .as_array()
        .and_then(|o| o.iter().find(|i| i["type"] == "function_call"))
        .unwrap_or_else(|| panic!("a function_call item: {v}"))
        .clone();
    assert_eq!(call["name"], "get_weather");
    let args: Value = serde_json::from_str(call["arguments"].as_str().expect("arguments"))
        .expect("JSON arguments");
    assert!(args["city"].is_string(), "{args}");
    assert!(call["call_id"].as_str().is_some_and(|c| !c.is_empty()));
    // The chat endpoint's forced call for the same conversation has the same arguments.
    let chat = post(
        &s,
        "/v1/chat/completions",
        json!({"model": "local", "max_tokens": 150, "temperature": 0, "tool_choice": "required",
               "tools": [{"type": "function", "function": {"name": "get_weather", "description": "weather for a city",
                          "parameters": tool["parameters"]}}],
               "messages": [{"role": "user", "content": "weather in Paris?"}]}),
        &[],
    )
    .await
    .json();
    let chat_args: Value = serde_json::from_str(
        chat["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
            .as_str()
            .expect("chat arguments"),
    )
    .expect("JSON");
    assert_eq!(args, chat_args);

    // Streamed: an output item for the call, argument deltas adding up to the same arguments.
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let evs = events(&post(&s, "/v1/responses", sreq, &[]).await.text);
    let added = evs
        .iter()
        .find(|e| e.0 == "response.output_item.added" && e.1["item"]["type"] == "function_call")
        .expect("a function_call item added");
    assert_eq!(added.1["item"]["name"], "get_weather");
    let streamed: String = evs
        .iter()
        .filter(|e| e.0 == "response.function_call_arguments.delta")
        .map(|e| e.1["delta"].as_str().expect("delta"))
        .collect();
    let done = evs
        .iter()
        .find(|e| e.0 == "response.function_call_arguments.done")
        .expect("arguments done");
    assert_eq!(done.1["arguments"].as_str(), Some(streamed.as_str()));
    assert_eq!(
        serde_json::from_str::<Value>(&streamed).expect("JSON"),
        args
    );
    assert_eq!(evs.last().map(|e| e.0.as_str()), Some("response.completed"));

    // The next turn sends the call and its output back as items.
    let next = json!({"model": "local", "max_output_tokens": 4, "tools": [tool], "input": [
        {"role": "user", "content": "weather in Paris?"},
        {"type": "function_call", "call_id": call["call_id"], "name": "get_weather", "arguments": call["arguments"]},
        {"type": "function_call_output", "call_id": call["call_id"], "output": "18 C and sunny"}]});
    let r = post(&s, "/v1/responses", next, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.json()["usage"]["input_tokens"].as_u64().unwrap_or(0) > 0);
}

#[tokio::test]
async fn what_is_not_served_is_refused_naming_the_field() {
    let s = Server::start();
    for (body, param) in [
        (
            json!({"model": "local", "input": "x", "previous_response_id": "resp_1"}),
            "previous_response_id",
        ),
        (
            json!({"model": "local", "input": "x", "previous_response_id": 7}),
            "previous_response_id",
        ),
        (
            json!({"model": "local", "input": "x", "background": true}),
            "background",
        ),
        (
            json!({"model": "local", "input": "x", "tools": [{"type": "web_search"}]}),
            "tools[0].type",
        ),
        (
            json!({"model": "local", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]}),
            "input[0].content[0].type",
        ),
        (
            json!({"model": "local", "input": [{"type": "file_search_call"}]}),
            "input[0].type",
        ),
        (json!({"model": "local", "input": 5}), "input"),
        (json!({"model": "local"}), "input"),
        (json!({"input": "x"}), "model"),
        (
            json!({"model": "local", "input": "x", "text": {"format": {"type": "xml"}}}),
            "text.format.type",
        ),
        (
            json!({"model": "local", "input": "x", "temperature": 9}),
            "temperature",
        ),
        (
            json!({"model": "local", "input": "x", "reasoning": {"effort": "max"}}),
            "reasoning.effort",
        ),
    ] {
        assert_refused(&s, "/v1/responses", body, param).await;
    }
    let r = post(
        &s,
        "/v1/responses",
        json!({"model": "no-such", "input": "x"}),
        &[],
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.text);
}

/// Stored responses: `previous_response_id` continues the conversation (the prompt is the
/// earlier turns plus the new input, without the earlier `instructions`), `GET` returns a
/// stored response, `DELETE` forgets it, and `store: false` keeps nothing.
#[tokio::test]
async fn previous_response_id_continues_a_stored_conversation() {
    let s = Server::start();
    let first = post(
        &s,
        "/v1/responses",
        json!({"model": "local", "instructions": "be brief", "input": "first question",
               "max_output_tokens": 5, "temperature": 0}),
        &[],
    )
    .await
    .json();
    let id = first["id"].as_str().expect("id").to_string();
    assert_eq!(first["store"], true);
    let answer = first["output"][0]["content"][0]["text"]
        .as_str()
        .expect("text")
        .to_string();
    let got = common::get(&s, &format!("/v1/responses/{id}")).await;
    assert_eq!(got.0, 200);
    assert_eq!(got.1, first, "GET returns the stored response");

    // The continuation's prompt: the stored turns, then the new input (no instructions).
    let second = post(
        &s,
        "/v1/responses",
        json!({"model": "local", "previous_response_id": id, "input": "second question",
               "max_output_tokens": 5, "temperature": 0}),
        &[],
    )
    .await
    .json();
    assert_eq!(second["previous_response_id"], id.as_str());
    let t = post(
        &s,
        "/tokenize",
        json!({"messages": [{"role": "user", "content": "first question"},
                            {"role": "assistant", "content": answer},
                            {"role": "user", "content": "second question"}]}),
        &[],
    )
    .await
    .json();
    assert_eq!(second["usage"]["input_tokens"], t["count"], "{second}");
    // The same answer as the chat endpoint gives that conversation.
    let chat = post(
        &s,
        "/v1/chat/completions",
        json!({"model": "local", "max_tokens": 5, "temperature": 0,
               "messages": [{"role": "user", "content": "first question"},
                            {"role": "assistant", "content": answer},
                            {"role": "user", "content": "second question"}]}),
        &[],
    )
    .await
    .json();
    assert_eq!(
        second["output"][0]["content"][0]["text"],
        chat["choices"][0]["message"]["content"]
    );

    // A streamed response is stored too, with what was streamed.
    let streamed = post(
        &s,
        "/v1/responses",
        json!({"model": "local", "previous_response_id": second["id"], "input": "third", "stream": true,
               "max_output_tokens": 4, "temperature": 0}),
        &[],
    )
    .await;
    let last: Value = parse_sse(&streamed.text)
        .last()
        .map(|(_, d)| serde_json::from_str(d).expect("json"))
        .expect("events");
    let sid = last["response"]["id"].as_str().expect("id").to_string();
    let got = common::get(&s, &format!("/v1/responses/{sid}")).await;
    assert_eq!(got.1["output"], last["response"]["output"]);

    // DELETE forgets; a forgotten or unstored id is a 404 to GET and a 400 to continue from.
    let r = client_delete(&s, &format!("/v1/responses/{id}")).await;
    assert_eq!(r.0, 200);
    assert_eq!(r.1["deleted"], true);
    assert_eq!(common::get(&s, &format!("/v1/responses/{id}")).await.0, 404);
    assert_eq!(
        client_delete(&s, &format!("/v1/responses/{id}")).await.0,
        404
    );
    let unstored = post(
        &s,
        "/v1/responses",
        json!({"model": "local", "input": "x", "store": false, "max_output_tokens": 2}),
        &[],
    )
    .await
    .json();
    assert_eq!(unstored["store"], false);
    let uid = unstored["id"].as_str().expect("id");
    assert_eq!(
        common::get(&s, &format!("/v1/responses/{uid}")).await.0,
        404
    );
    for gone in [id.as_str(), uid] {
        assert_refused(
            &s,
            "/v1/responses",
            json!({"model": "local", "input": "x", "previous_response_id": gone}),
            "previous_response_id",
        )
        .await;
    }
}

async fn client_delete(s: &Server, path: &str) -> (u16, Value) {
    let r = common::client()
        .delete(s.url(path))
        .send()
        .await
        .expect("send");
    let status = r.status().as_u16();
    (status, r.json().await.expect("json"))
}
