//! A component with the right world *name* but another package's shape: its `validate` takes
//! and returns JSON text. The host must refuse to install it in any slot.
wit_bindgen::generate!({
    inline: r#"
        package other:policy@0.1.0;
        world validate-plugin {
            export validate: func(body: string) -> result<string, string>;
            export self-test: func() -> result<_, string>;
        }
    "#,
});

struct Component;

impl Guest for Component {
    fn validate(body: String) -> Result<String, String> {
        Ok(body)
    }

    fn self_test() -> Result<(), String> {
        Ok(())
    }
}

export!(Component);
