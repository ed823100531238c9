use memcoord::config::Settings;
use memcoord::dispatch::Dispatcher;
use memcoord::service::MemoryService;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

fn model(path: &std::path::Path, floats: usize) {
    let h = format!(
        "{{\"w\":{{\"dtype\":\"F32\",\"shape\":[{floats}],\"data_offsets\":[0,{}]}}}}",
        floats * 4
    );
    let mut h = h.into_bytes();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut b = (h.len() as u64).to_le_bytes().to_vec();
    b.extend(h);
    b.extend(vec![0u8; floats * 4]);
    std::fs::write(path, b).unwrap();
}

#[test]
fn race() {
    let root = std::env::temp_dir().join("memcoord-race-models");
    std::fs::create_dir_all(&root).unwrap();
    model(&root.join("big.safetensors"), 6 << 20); // 24 MiB
    model(&root.join("tiny.safetensors"), 256); // 1 KiB
    let mut s = Settings::default();
    s.set_budget("cpu=64MiB").unwrap();
    s.set_budget("shm=64MiB").unwrap();
    s.no_gpu = true;
    let svc = Arc::new(MemoryService::new(s.host_devices().unwrap()).with_model_root(&root));
    let d = Dispatcher::new(svc);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let send = |a: &str, data: Value| -> Value {
        let line = json!({"request_id":"r","action":a,"data":data}).to_string();
        let mut out = Vec::new();
        let bytes = match d.handle_line(line.as_bytes(), &mut out) {
            None => out,
            Some(p) => rt.block_on(p.response),
        };
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        println!("> {line}\n< {v}");
        v
    };
    let spawn = |a: &str, data: Value| {
        let line = json!({"request_id":"bg","action":a,"data":data}).to_string();
        println!("> (not waited for) {line}");
        let mut out = Vec::new();
        let p = d.handle_line(line.as_bytes(), &mut out).unwrap();
        rt.spawn(p.response)
    };
    let filler = send(
        "memory.allocate",
        json!({"device_id":"shm","size_bytes":60<<20,"timeout_seconds":0}),
    );
    let filler = filler["data"]["allocation"]["allocation_id"]
        .as_str()
        .unwrap()
        .to_string();
    let first = spawn(
        "memory.model_load",
        json!({"model_name":"A","path":"big.safetensors","device_id":"shm","timeout_seconds":5}),
    );
    std::thread::sleep(Duration::from_millis(100));
    send(
        "memory.model_unload",
        json!({"model_name":"A","force":true}),
    );
    send(
        "memory.model_load",
        json!({"model_name":"A","path":"tiny.safetensors","device_id":"shm"}),
    );
    send("memory.deallocate", json!({"allocation_id": filler}));
    let v: Value = serde_json::from_slice(&rt.block_on(first).unwrap()).unwrap();
    println!("< (first load) {v}");
    send("memory.model_status", json!({"model_name":"A"}));
    send(
        "memory.get_allocations",
        json!({"device_id":"cpu","owner":"model:A"}),
    );
    send(
        "memory.get_allocations",
        json!({"device_id":"shm","owner":"model:A"}),
    );
    send(
        "memory.model_unload",
        json!({"model_name":"A","force":true}),
    );
    let left = send(
        "memory.get_allocations",
        json!({"device_id":"shm","owner":"model:A"}),
    );
    let orphan = left["data"]["allocations"][0]["allocation_id"]
        .as_str()
        .map(str::to_string);
    if let Some(o) = orphan {
        send("memory.deallocate", json!({"allocation_id": o}));
    }
    send(
        "memory.model_unload",
        json!({"model_name":"A","force":true}),
    );
    send("memory.clear", json!({"device_id":"shm","force":true}));
    send(
        "memory.optimize",
        json!({"device_id":"shm","optimization_type":"Full","force":true,"target_usage_percentage":0,"wait_for_completion":true}),
    );
    send("memory.model_optimize", json!({"strategy":"UnloadIdle"}));
    send("memory.get_usage", json!({"device_id":"shm"}));
}
