//! Fixed newstyle negotiation: greeting, client flags, then options until the client picks
//! an export (`NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`) or leaves.
//!
//! Every option is answered (unknown ones with `NBD_REP_ERR_UNSUP`, malformed ones with
//! `NBD_REP_ERR_INVALID`), so a client can probe freely. The connection is dropped only where
//! the protocol leaves no other way: unknown client flags, a wrong option magic (the stream
//! is out of step), an `NBD_OPT_EXPORT_NAME` for an export that does not exist, or option
//! data too large to be worth skipping.

use crate::export::{Catalog, Export, ExportError, ExportInfo};
use crate::proto::*;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Option data we read into memory; larger options are skipped and refused.
const MAX_OPTION: u32 = 64 << 10;
/// Option data we are willing to skip at all; beyond this the client is misbehaving.
const MAX_SKIP: u32 = 16 << 20;

/// What the negotiation agreed on, for the transmission phase.
pub(crate) struct Session {
    pub name: String,
    pub export: Arc<dyn Export>,
    /// Export size announced to the client (every request is checked against it).
    pub size: u64,
    pub flags: u16,
    pub structured: bool,
    /// The client selected `base:allocation` for this export.
    pub base_allocation: bool,
}

/// Why a negotiation ended without an export.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("unknown client flags {0:#x}")]
    ClientFlags(u32),
    #[error("bad option magic {0:#018x}")]
    OptionMagic(u64),
    #[error("option {option} carries {len} bytes, more than we skip")]
    TooLarge { option: u32, len: u32 },
    #[error("NBD_OPT_EXPORT_NAME for an unknown or unusable export {0:?}")]
    ExportName(String),
    #[error("looking up the export: {0}")]
    Catalog(#[from] ExportError),
}

/// Transmission flags of `info` for a client that did (or did not) negotiate structured
/// replies.
pub(crate) fn transmission_flags(info: &ExportInfo, structured: bool) -> u16 {
    // CACHE reads the range ahead (warming the chunkservers' caches) and drops it.
    let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_CACHE;
    if info.read_only {
        f |= FLAG_READ_ONLY;
    } else {
        // A fast zero is a punched range; one that must not leave a hole is written as
        // data, so a FAST_ZERO request that also says NO_HOLE fails at once (ENOTSUP).
        f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    }
    if info.multi_conn {
        f |= FLAG_CAN_MULTI_CONN;
    }
    if structured {
        // Our reads send one data chunk, so "don't fragment" always holds.
        f |= FLAG_SEND_DF;
    }
    f
}

/// What a connection that opened `export` gets: the catalog decides read-only and
/// multi-conn per connection when it opens (a second client of a single-writer volume reads
/// only), which may differ from what `info` said a moment before.
fn opened(mut info: ExportInfo, export: Option<&dyn Export>) -> ExportInfo {
    if let Some(e) = export {
        info.read_only = e.read_only();
        info.multi_conn = e.multi_conn();
    }
    info
}

/// A reader over option data that never reads past its end.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// A string prefixed by its 32-bit length, at most [`MAX_STRING`] bytes of UTF-8.
    fn string(&mut self) -> Option<&'a str> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return None;
        }
        std::str::from_utf8(self.take(n)?).ok()
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO` data: export name and the information types asked for.
fn parse_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let mut c = Cursor(data);
    let name = c.string()?.to_string();
    let n = c.u16()?;
    let wants = (0..n).map(|_| c.u16()).collect::<Option<Vec<_>>>()?;
    c.is_empty().then_some((name, wants))
}

/// `NBD_OPT_{LIST,SET}_META_CONTEXT` data: export name and queries.
fn parse_meta_request(data: &[u8]) -> Option<(String, Vec<String>)> {
    let mut c = Cursor(data);
    let name = c.string()?.to_string();
    let n = c.u32()?;
    // Each query takes at least its 4-byte length: a count beyond that is a lie.
    if n as usize > data.len() / 4 {
        return None;
    }
    let queries = (0..n)
        .map(|_| c.string().map(str::to_string))
        .collect::<Option<Vec<_>>>()?;
    c.is_empty().then_some((name, queries))
}

/// True if `query` selects `base:allocation` (for LIST, the namespace alone also does).
fn matches_base_allocation(query: &str, list: bool) -> bool {
    query == BASE_ALLOCATION || (list && query == "base:")
}

/// The negotiation with one client.
struct Negotiation<'a, R, W> {
    r: &'a mut R,
    w: &'a mut W,
    catalog: &'a dyn Catalog,
    structured: bool,
    /// Export for which `base:allocation` was selected, if any.
    meta_for: Option<String>,
}

impl<R, W> Negotiation<'_, R, W>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    async fn reply(&mut self, option: u32, kind: u32, data: &[u8]) -> std::io::Result<()> {
        self.w.write_all(&option_reply(option, kind, data)).await
    }

    async fn error(&mut self, option: u32, kind: u32, message: &str) -> std::io::Result<()> {
        tracing::debug!(option, kind, message, "refused option");
        let msg = truncate_utf8(message, MAX_STRING);
        self.reply(option, kind, msg.as_bytes()).await?;
        self.w.flush().await
    }

    async fn ack(&mut self, option: u32) -> std::io::Result<()> {
        self.reply(option, REP_ACK, &[]).await?;
        self.w.flush().await
    }

    async fn list(&mut self) -> Result<(), HandshakeError> {
        let all = self.catalog.list().await?;
        for e in all {
            let mut data = Vec::with_capacity(4 + e.name.len() + e.description.len());
            data.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
            data.extend_from_slice(e.name.as_bytes());
            data.extend_from_slice(e.description.as_bytes());
            self.reply(OPT_LIST, REP_SERVER, &data).await?;
        }
        self.ack(OPT_LIST).await?;
        Ok(())
    }

    /// `NBD_OPT_INFO` or `NBD_OPT_GO`; returns the session for a successful GO.
    async fn info_or_go(
        &mut self,
        option: u32,
        data: &[u8],
    ) -> Result<Option<Session>, HandshakeError> {
        let Some((name, wants)) = parse_info_request(data) else {
            self.error(option, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO request")
                .await?;
            return Ok(None);
        };
        let Some(info) = self.catalog.info(&name).await? else {
            self.error(
                option,
                REP_ERR_UNKNOWN,
                &format!("no export named {name:?}"),
            )
            .await?;
            return Ok(None);
        };
        let export = if option == OPT_GO {
            match self.catalog.open(&name).await? {
                Some(e) => Some(e),
                None => {
                    self.error(
                        option,
                        REP_ERR_UNKNOWN,
                        &format!("no export named {name:?}"),
                    )
                    .await?;
                    return Ok(None);
                }
            }
        } else {
            None
        };
        let size = export.as_ref().map_or(info.size, |e| e.size());
        let flags = transmission_flags(&opened(info.clone(), export.as_deref()), self.structured);
        // All replies in one buffer: once the export is open, a failed write must close it.
        let mut out = Vec::with_capacity(128);
        let mut d = Vec::with_capacity(12);
        d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        d.extend_from_slice(&size.to_be_bytes());
        d.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&option_reply(option, REP_INFO, &d));
        // Block sizes go out whether asked for or not (the protocol allows it), so clients
        // that never ask still learn the 32 MiB payload limit.
        let mut d = Vec::with_capacity(14);
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&MIN_BLOCK.to_be_bytes());
        d.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
        d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
        out.extend_from_slice(&option_reply(option, REP_INFO, &d));
        if wants.contains(&INFO_NAME) {
            let mut d = INFO_NAME.to_be_bytes().to_vec();
            d.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&option_reply(option, REP_INFO, &d));
        }
        if wants.contains(&INFO_DESCRIPTION) && !info.description.is_empty() {
            let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
            d.extend_from_slice(truncate_utf8(&info.description, MAX_STRING).as_bytes());
            out.extend_from_slice(&option_reply(option, REP_INFO, &d));
        }
        out.extend_from_slice(&option_reply(option, REP_ACK, &[]));
        let sent = async {
            self.w.write_all(&out).await?;
            self.w.flush().await
        }
        .await;
        if let Err(e) = sent {
            if let Some(export) = export {
                self.catalog.close(&name, export).await;
            }
            return Err(e.into());
        }
        Ok(export.map(|export| Session {
            base_allocation: self.meta_for.as_deref() == Some(name.as_str()),
            name,
            export,
            size,
            flags,
            structured: self.structured,
        }))
    }

    async fn meta_context(&mut self, option: u32, data: &[u8]) -> Result<(), HandshakeError> {
        if !self.structured {
            self.error(
                option,
                REP_ERR_INVALID,
                "negotiate structured replies first",
            )
            .await?;
            return Ok(());
        }
        let Some((name, queries)) = parse_meta_request(data) else {
            self.error(option, REP_ERR_INVALID, "malformed meta context request")
                .await?;
            return Ok(());
        };
        if self.catalog.info(&name).await?.is_none() {
            self.error(
                option,
                REP_ERR_UNKNOWN,
                &format!("no export named {name:?}"),
            )
            .await?;
            return Ok(());
        }
        let list = option == OPT_LIST_META_CONTEXT;
        let selected = if list && queries.is_empty() {
            true
        } else {
            queries.iter().any(|q| matches_base_allocation(q, list))
        };
        if !list {
            self.meta_for = selected.then(|| name.clone());
        }
        if selected {
            // LIST replies carry id 0 (reserved); SET gives the id used in BLOCK_STATUS.
            let id = if list { 0 } else { BASE_ALLOCATION_ID };
            let mut d = id.to_be_bytes().to_vec();
            d.extend_from_slice(BASE_ALLOCATION.as_bytes());
            self.reply(option, REP_META_CONTEXT, &d).await?;
        }
        self.ack(option).await?;
        Ok(())
    }

    /// `NBD_OPT_EXPORT_NAME`: no error reply exists, so an unknown name ends the session.
    async fn export_name(
        &mut self,
        data: &[u8],
        no_zeroes: bool,
    ) -> Result<Session, HandshakeError> {
        let name = std::str::from_utf8(data)
            .ok()
            .filter(|n| n.len() <= MAX_STRING)
            .ok_or_else(|| HandshakeError::ExportName(String::from_utf8_lossy(data).into_owned()))?
            .to_string();
        let info = self
            .catalog
            .info(&name)
            .await?
            .ok_or_else(|| HandshakeError::ExportName(name.clone()))?;
        let export = self
            .catalog
            .open(&name)
            .await?
            .ok_or_else(|| HandshakeError::ExportName(name.clone()))?;
        let size = export.size();
        let flags = transmission_flags(
            &opened(info.clone(), Some(export.as_ref())),
            self.structured,
        );
        let mut d = Vec::with_capacity(134);
        d.extend_from_slice(&size.to_be_bytes());
        d.extend_from_slice(&flags.to_be_bytes());
        if !no_zeroes {
            d.extend_from_slice(&[0u8; 124]);
        }
        let session = Session {
            base_allocation: self.meta_for.as_deref() == Some(name.as_str()),
            name,
            export,
            size,
            flags,
            structured: self.structured,
        };
        if let Err(e) = async {
            self.w.write_all(&d).await?;
            self.w.flush().await
        }
        .await
        {
            self.catalog.close(&session.name, session.export).await;
            return Err(e.into());
        }
        Ok(session)
    }
}

/// Runs the negotiation. `Ok(None)`: the client left cleanly (`NBD_OPT_ABORT`, or EOF
/// between options). `shutting_down` makes every option but ABORT fail with
/// `NBD_REP_ERR_SHUTDOWN`.
pub(crate) async fn negotiate<R, W>(
    r: &mut R,
    w: &mut W,
    catalog: &dyn Catalog,
    shutting_down: impl Fn() -> bool,
) -> Result<Option<Session>, HandshakeError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&greeting).await?;
    w.flush().await?;
    let client_flags = r.read_u32().await?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeError::ClientFlags(client_flags));
    }
    // A client without FLAG_C_FIXED_NEWSTYLE gets fixed newstyle anyway (the protocol allows
    // it): it can only send NBD_OPT_EXPORT_NAME, which is the same in both.
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let mut n = Negotiation {
        r,
        w,
        catalog,
        structured: false,
        meta_for: None,
    };
    loop {
        let mut head = [0u8; 16];
        match n.r.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&head[0..8]);
        let magic = u64::from_be_bytes(magic);
        if magic != IHAVEOPT {
            return Err(HandshakeError::OptionMagic(magic));
        }
        let option = u32::from_be_bytes([head[8], head[9], head[10], head[11]]);
        let len = u32::from_be_bytes([head[12], head[13], head[14], head[15]]);
        if len > MAX_OPTION {
            if len > MAX_SKIP || option == OPT_EXPORT_NAME {
                return Err(HandshakeError::TooLarge { option, len });
            }
            tokio::io::copy(
                &mut (&mut *n.r).take(u64::from(len)),
                &mut tokio::io::sink(),
            )
            .await?;
            n.error(option, REP_ERR_TOO_BIG, "option data too large")
                .await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        n.r.read_exact(&mut data).await?;
        if option == OPT_ABORT {
            // The client may already be gone; that is fine.
            let _ = n.ack(OPT_ABORT).await;
            return Ok(None);
        }
        if shutting_down() {
            if option == OPT_EXPORT_NAME {
                return Err(HandshakeError::ExportName(
                    String::from_utf8_lossy(&data).into_owned(),
                ));
            }
            n.error(option, REP_ERR_SHUTDOWN, "the server is shutting down")
                .await?;
            continue;
        }
        match option {
            OPT_EXPORT_NAME => return n.export_name(&data, no_zeroes).await.map(Some),
            OPT_LIST if !data.is_empty() => {
                n.error(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                    .await?
            }
            OPT_LIST => n.list().await?,
            OPT_INFO | OPT_GO => {
                if let Some(s) = n.info_or_go(option, &data).await? {
                    return Ok(Some(s));
                }
            }
            OPT_STRUCTURED_REPLY if !data.is_empty() => {
                n.error(
                    option,
                    REP_ERR_INVALID,
                    "NBD_OPT_STRUCTURED_REPLY takes no data",
                )
                .await?
            }
            OPT_STRUCTURED_REPLY => {
                n.structured = true;
                n.ack(option).await?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => n.meta_context(option, &data).await?,
            OPT_STARTTLS => {
                n.error(option, REP_ERR_UNSUP, "TLS is not supported")
                    .await?
            }
            _ => n.error(option, REP_ERR_UNSUP, "unknown option").await?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(s: &str) -> Vec<u8> {
        let mut v = (s.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(s.as_bytes());
        v
    }

    #[test]
    fn info_requests_parse_exactly() {
        let mut d = string("vol");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            parse_info_request(&d),
            Some(("vol".to_string(), vec![INFO_NAME, INFO_BLOCK_SIZE]))
        );
        assert_eq!(parse_info_request(&d[..d.len() - 1]), None, "short");
        let mut long = d.clone();
        long.push(0);
        assert_eq!(parse_info_request(&long), None, "trailing bytes");
        let mut huge = u32::MAX.to_be_bytes().to_vec();
        huge.extend_from_slice(b"x");
        assert_eq!(parse_info_request(&huge), None, "name length past the data");
    }

    #[test]
    fn meta_requests_parse_and_match() {
        let mut d = string("vol");
        d.extend_from_slice(&2u32.to_be_bytes());
        d.extend_from_slice(&string("base:allocation"));
        d.extend_from_slice(&string("qemu:dirty-bitmap:x"));
        let (name, q) = parse_meta_request(&d).expect("parses");
        assert_eq!(name, "vol");
        assert_eq!(q.len(), 2);
        assert!(matches_base_allocation(&q[0], false));
        assert!(!matches_base_allocation(&q[1], true));
        assert!(matches_base_allocation("base:", true));
        assert!(!matches_base_allocation("base:", false));
        let mut lie = string("vol");
        lie.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_meta_request(&lie), None, "query count past the data");
    }

    #[test]
    fn flags_follow_the_export_and_negotiation() {
        let mut info = ExportInfo {
            name: "v".into(),
            size: 1,
            read_only: false,
            multi_conn: true,
            description: String::new(),
        };
        let f = transmission_flags(&info, false);
        assert_eq!(
            f,
            FLAG_HAS_FLAGS
                | FLAG_SEND_FLUSH
                | FLAG_SEND_FUA
                | FLAG_SEND_CACHE
                | FLAG_SEND_TRIM
                | FLAG_SEND_WRITE_ZEROES
                | FLAG_SEND_FAST_ZERO
                | FLAG_CAN_MULTI_CONN
        );
        assert_ne!(transmission_flags(&info, true) & FLAG_SEND_DF, 0);
        info.read_only = true;
        let f = transmission_flags(&info, false);
        assert_ne!(f & FLAG_READ_ONLY, 0);
        assert_eq!(
            f & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO),
            0
        );
        assert_ne!(f & FLAG_SEND_CACHE, 0, "a snapshot can be read ahead too");
    }
}
