//! Scenario conversation kinds through the gateway (issue 16): a real nats-server, the real
//! `tidings serve`, two users on real WebSockets in a class conversation. A parent cannot
//! change their own display name (typed `NOT_ALLOWED`, nothing written); the teacher can;
//! the member list carries roles and names. (Every rule of every kind, and the rename fix,
//! are proven in process: services/log/tests/kinds.rs.)

use crate::common;
use crate::common::{Nats, Sandbox, Server};
use tidings_client::Connection;
use tidings_client::client::ErrorCode;

async fn connect(server: &Server, s: &Sandbox, user: &str) -> Connection {
    let token = s.token("acme", user, 3600);
    Connection::open(&server.url(), &token, "test")
        .await
        .expect("connect")
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_class_lets_the_teacher_name_a_parent_and_not_the_parent() {
    let s = Sandbox::new();
    let nats = Nats::start();
    let server = Server::start(&s, &nats, "all", &[]);
    let teacher = connect(&server, &s, "ms-li").await;
    teacher
        .create_conversation_of_kind("class-1a", "class", "Class 1A", &[])
        .await
        .expect("create a class");
    teacher
        .add_member_as("class-1a", "xiaoming-dad", "parent")
        .await
        .expect("add a parent");
    let parent = connect(&server, &s, "xiaoming-dad").await;

    let refused = parent
        .set_display_name("class-1a", "xiaoming-dad", "Cool Dad")
        .await
        .expect_err("a parent's name is not theirs to set");
    assert_eq!(
        common::error_code(&refused),
        Some(ErrorCode::NotAllowed),
        "{refused}"
    );
    let refused = parent
        .add_member("class-1a", "stranger")
        .await
        .expect_err("parents do not add");
    assert_eq!(
        common::error_code(&refused),
        Some(ErrorCode::NotAllowed),
        "{refused}"
    );

    teacher
        .set_display_name("class-1a", "xiaoming-dad", "Xiaoming's dad")
        .await
        .expect("the teacher names him");
    parent
        .send_text("class-1a", "m1", "hello teacher")
        .await
        .expect("parents post");
    let members = parent
        .list_members("class-1a", "", 10)
        .await
        .expect("members");
    let shown: Vec<(&str, &str, &str)> = members
        .iter()
        .map(|m| {
            (
                m.user.as_str(),
                m.role_name.as_str(),
                m.display_name.as_str(),
            )
        })
        .collect();
    assert_eq!(
        shown,
        vec![
            ("ms-li", "teacher", ""),
            ("xiaoming-dad", "parent", "Xiaoming's dad")
        ]
    );
}
