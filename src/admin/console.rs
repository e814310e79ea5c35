//! The web console: one static page with its script and style, embedded in the binary
//! (no build step, nothing fetched from elsewhere). The files hold no data and are
//! served without the token; the page asks for it and sends it with every API call.

use super::Reply;

const INDEX: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/console.js");
const STYLE: &str = include_str!("console/console.css");

/// The console file at `path`, if it is one.
pub(super) fn file(path: &str) -> Option<Reply> {
    let (content_type, body) = match path {
        "/" | "/index.html" => ("text/html; charset=utf-8", INDEX),
        "/console.js" => ("text/javascript; charset=utf-8", SCRIPT),
        "/console.css" => ("text/css; charset=utf-8", STYLE),
        // Browsers ask for it; nothing to show, and no reason for a 401 in the console.
        "/favicon.ico" => ("image/x-icon", ""),
        _ => return None,
    };
    Some(Reply::static_file(content_type, body))
}
