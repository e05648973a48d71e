//! Where wanserve keeps per-machine state outside any data directory: the ONNX Runtime that
//! `scripts/setup` installs and the model verification stamps. `$WANSERVE_HOME`, else
//! `$XDG_DATA_HOME/wanserve`, else `~/.local/share/wanserve`.

use std::path::PathBuf;

pub fn wanserve_home() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("WANSERVE_HOME") {
        return Some(PathBuf::from(home));
    }
    if let Some(data) = std::env::var_os("XDG_DATA_HOME") {
        return Some(PathBuf::from(data).join("wanserve"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share/wanserve"))
}
