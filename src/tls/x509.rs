//! The few fields contactd reads from an X.509 certificate: its validity
//! period, its subject (the common name, and the raw name to compare), its
//! public key, and its DNS subjectAltNames.
//!
//! Hand-written over a minimal DER reader rather than with `x509-parser`:
//! that crate brought nom, asn1-rs with its derive macros, der-parser,
//! num-bigint and an OID registry into every cold build (a real share of the
//! CI budget on 2 cores) for these few fields. Nothing here decides trust:
//! rustls/webpki has verified a peer's chain before [`super::identity`]
//! reads its name, and the validity check only refuses an operator's own
//! file early. Every read is bounds-checked and returns `None` on anything
//! unexpected; the tests feed it every truncation of real certificates.

use std::time::SystemTime;

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const INTEGER: u8 = 0x02;
const OID: u8 = 0x06;
const BOOLEAN: u8 = 0x01;
const OCTET_STRING: u8 = 0x04;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
/// `[0] EXPLICIT Version`, `[3] EXPLICIT Extensions` in a TBSCertificate.
const VERSION: u8 = 0xa0;
const EXTENSIONS: u8 = 0xa3;
/// `[2] IMPLICIT IA5String`: a GeneralName's dNSName.
const DNS_NAME: u8 = 0x82;
/// id-at-commonName, 2.5.4.3.
const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
/// id-ce-subjectAltName, 2.5.29.17.
const SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];

/// A DER reader over one level of a structure.
#[derive(Clone, Copy)]
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn peek(&self) -> Option<u8> {
        self.0.first().copied()
    }

    /// The next element: its tag, its contents, and its whole encoding.
    fn next(&mut self) -> Option<(u8, &'a [u8], &'a [u8])> {
        let data = self.0;
        let (&tag, rest) = data.split_first()?;
        if tag & 0x1f == 0x1f {
            return None; // high tag numbers: nothing in a certificate we read
        }
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            // Long form, at most 4 length bytes; 0x80 (indefinite) is BER.
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let (bytes, after) = rest.split_at(n);
            rest = after;
            bytes
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
        };
        if rest.len() < len {
            return None;
        }
        let header = data.len() - rest.len();
        let (contents, after) = rest.split_at(len);
        self.0 = after;
        Some((tag, contents, &data[..header + len]))
    }

    /// The next element's contents, if it has `tag`.
    fn expect(&mut self, tag: u8) -> Option<&'a [u8]> {
        match self.next()? {
            (t, contents, _) if t == tag => Some(contents),
            _ => None,
        }
    }

    /// The next element's whole encoding, if it has `tag`.
    fn expect_raw(&mut self, tag: u8) -> Option<&'a [u8]> {
        match self.next()? {
            (t, _, raw) if t == tag => Some(raw),
            _ => None,
        }
    }
}

/// The fields of a certificate contactd uses, borrowed from its DER.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate<'a> {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The subject Name, whole (tag and length included).
    pub subject: &'a [u8],
    /// The SubjectPublicKeyInfo, whole.
    pub public_key: &'a [u8],
    /// The contents of the extensions' SEQUENCE, if any.
    extensions: Option<&'a [u8]>,
}

/// Reads a DER certificate; `None` if it is not one.
pub fn parse(der: &[u8]) -> Option<Certificate<'_>> {
    let mut outer = Der(der);
    let mut cert = Der(outer.expect(SEQUENCE)?);
    if !outer.is_empty() {
        return None;
    }
    let mut tbs = Der(cert.expect(SEQUENCE)?);
    if tbs.peek() == Some(VERSION) {
        tbs.next()?;
    }
    tbs.expect(INTEGER)?; // serialNumber
    tbs.expect(SEQUENCE)?; // signature algorithm
    tbs.expect(SEQUENCE)?; // issuer
    let mut validity = Der(tbs.expect(SEQUENCE)?);
    let not_before = time(validity.next()?)?;
    let not_after = time(validity.next()?)?;
    let subject = tbs.expect_raw(SEQUENCE)?;
    let public_key = tbs.expect_raw(SEQUENCE)?;
    let mut extensions = None;
    while let Some((tag, contents, _)) = tbs.next() {
        // [1] and [2] are the unique identifiers, which we skip.
        if tag == EXTENSIONS {
            extensions = Some(Der(contents).expect(SEQUENCE)?);
        }
    }
    Some(Certificate {
        not_before,
        not_after,
        subject,
        public_key,
        extensions,
    })
}

impl<'a> Certificate<'a> {
    /// The DNS names of the subjectAltName extension, in order. Names that
    /// are not ASCII are skipped (an IA5String cannot hold anything else).
    pub fn dns_names(&self) -> Vec<&'a str> {
        let mut names = Vec::new();
        let Some(extensions) = self.extensions else {
            return names;
        };
        let mut extensions = Der(extensions);
        while let Some(extension) = extensions.expect(SEQUENCE) {
            let mut extension = Der(extension);
            if extension.expect(OID) != Some(SUBJECT_ALT_NAME) {
                continue;
            }
            if extension.peek() == Some(BOOLEAN) {
                extension.next();
            }
            let Some(mut general_names) = extension
                .expect(OCTET_STRING)
                .and_then(|value| Der(value).expect(SEQUENCE))
                .map(Der)
            else {
                return names;
            };
            while let Some((tag, contents, _)) = general_names.next() {
                if tag == DNS_NAME
                    && contents.is_ascii()
                    && let Ok(name) = std::str::from_utf8(contents)
                {
                    names.push(name);
                }
            }
            return names;
        }
        names
    }

    /// The subject's first common name, if it is text.
    pub fn common_name(&self) -> Option<&'a str> {
        let mut name = Der(self.subject);
        let mut rdns = Der(name.expect(SEQUENCE)?);
        while let Some(rdn) = rdns.expect(SET) {
            let mut rdn = Der(rdn);
            while let Some(attribute) = rdn.expect(SEQUENCE) {
                let mut attribute = Der(attribute);
                if attribute.expect(OID) == Some(COMMON_NAME) {
                    // UTF8String, PrintableString, IA5String, TeletexString
                    // (read as UTF-8); BMPString and others are not text here.
                    let (tag, value, _) = attribute.next()?;
                    return matches!(tag, 0x0c | 0x13 | 0x16 | 0x14)
                        .then(|| std::str::from_utf8(value).ok())
                        .flatten();
                }
            }
        }
        None
    }
}

/// A UTCTime (`YYMMDDHHMMSSZ`, years 1950 to 2049) or GeneralizedTime
/// (`YYYYMMDDHHMMSSZ`), the only forms RFC 5280 allows in a certificate.
fn time((tag, text, _): (u8, &[u8], &[u8])) -> Option<SystemTime> {
    let digits = |range: std::ops::Range<usize>| -> Option<u32> {
        let part = text.get(range)?;
        part.iter().all(u8::is_ascii_digit).then(|| {
            part.iter()
                .fold(0u32, |acc, &d| acc * 10 + u32::from(d - b'0'))
        })
    };
    let (year, rest) = match (tag, text.len()) {
        (UTC_TIME, 13) => {
            let yy = digits(0..2)?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, 2)
        }
        (GENERALIZED_TIME, 15) => (digits(0..4)?, 4),
        _ => return None,
    };
    if text.last() != Some(&b'Z') {
        return None;
    }
    let at = |i: usize| digits(rest + i..rest + i + 2);
    let month = time::Month::try_from(u8::try_from(at(0)?).ok()?).ok()?;
    let date = time::Date::from_calendar_date(
        i32::try_from(year).ok()?,
        month,
        u8::try_from(at(2)?).ok()?,
    )
    .ok()?;
    let clock = time::Time::from_hms(
        u8::try_from(at(4)?).ok()?,
        u8::try_from(at(6)?).ok()?,
        u8::try_from(at(8)?).ok()?,
    )
    .ok()?;
    Some(
        time::PrimitiveDateTime::new(date, clock)
            .assume_utc()
            .into(),
    )
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use rcgen::{CertificateParams, DnType, KeyPair, PublicKeyData};

    use super::*;

    fn cert(build: impl FnOnce(&mut CertificateParams)) -> Vec<u8> {
        let mut params = CertificateParams::default();
        build(&mut params);
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_names_and_validity() {
        let now = time::OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .unwrap();
        let der = cert(|p| {
            p.distinguished_name = rcgen::DistinguishedName::new();
            p.distinguished_name.push(DnType::OrganizationName, "ops");
            p.distinguished_name.push(DnType::CommonName, "web1 cn");
            p.subject_alt_names = vec![
                rcgen::SanType::IpAddress([127, 0, 0, 1].into()),
                rcgen::SanType::DnsName("web1.example".try_into().unwrap()),
                rcgen::SanType::DnsName("web1".try_into().unwrap()),
            ];
            p.not_before = now - time::Duration::hours(1);
            // After 2049: a GeneralizedTime.
            p.not_after = now + time::Duration::days(365 * 40);
        });
        let parsed = parse(&der).unwrap();
        assert_eq!(parsed.dns_names(), ["web1.example", "web1"]);
        assert_eq!(parsed.common_name(), Some("web1 cn"));
        let expect = |t: time::OffsetDateTime| SystemTime::from(t);
        assert_eq!(parsed.not_before, expect(now - time::Duration::hours(1)));
        assert_eq!(
            parsed.not_after,
            expect(now + time::Duration::days(365 * 40))
        );
        assert!(parsed.not_after > SystemTime::now() + Duration::from_secs(86_400 * 365 * 30));
    }

    #[test]
    fn no_san_and_no_cn() {
        let der = cert(|p| {
            p.distinguished_name = rcgen::DistinguishedName::new();
            p.distinguished_name.push(DnType::CommonName, "only-cn");
        });
        let parsed = parse(&der).unwrap();
        assert!(parsed.dns_names().is_empty());
        assert_eq!(parsed.common_name(), Some("only-cn"));

        let der = cert(|p| {
            p.distinguished_name = rcgen::DistinguishedName::new();
            p.distinguished_name.push(DnType::OrganizationName, "no cn");
        });
        assert_eq!(parse(&der).unwrap().common_name(), None);
    }

    #[test]
    fn subject_and_key_are_whole_elements() {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "ca");
        let der = params.self_signed(&key).unwrap().der().to_vec();
        let parsed = parse(&der).unwrap();
        assert_eq!(parsed.public_key, key.subject_public_key_info().as_slice());
        assert_eq!(parsed.subject[0], SEQUENCE);
        // Self-signed: the issuer is the subject, so the subject's encoding
        // appears twice.
        let twice = der
            .windows(parsed.subject.len())
            .filter(|w| *w == parsed.subject)
            .count();
        assert_eq!(twice, 2);
    }

    /// Every truncation, and every single-byte corruption of the headers,
    /// of a real certificate: `None` or a result, never a panic.
    #[test]
    fn hostile_bytes_never_panic() {
        let der = cert(|p| {
            p.subject_alt_names = vec![rcgen::SanType::DnsName("x".try_into().unwrap())];
        });
        for len in 0..der.len() {
            assert!(parse(&der[..len]).is_none(), "truncated at {len}");
        }
        for i in 0..der.len().min(512) {
            for value in [0x00, 0x80, 0x84, 0xff] {
                let mut bad = der.clone();
                bad[i] = value;
                if let Some(c) = parse(&bad) {
                    let _ = (c.dns_names(), c.common_name());
                }
            }
        }
        let mut trailing = der.clone();
        trailing.push(0);
        assert!(parse(&trailing).is_none());
        assert!(parse(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_none());
        assert!(parse(&[0x30, 0x80, 0x00, 0x00]).is_none());
    }

    #[test]
    fn times() {
        let at = |tag, text: &str| time((tag, text.as_bytes(), &[]));
        let unix = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(unix(at(UTC_TIME, "700101000000Z").unwrap()), 0);
        assert_eq!(unix(at(UTC_TIME, "491231235959Z").unwrap()), 2_524_607_999);
        assert_eq!(
            unix(at(GENERALIZED_TIME, "20500101000000Z").unwrap()),
            2_524_608_000
        );
        for bad in [
            "700101000000",
            "701301000000Z",
            "700132000000Z",
            "700101250000Z",
            "7001010000+0Z",
        ] {
            assert!(at(UTC_TIME, bad).is_none(), "{bad}");
        }
        assert!(at(GENERALIZED_TIME, "700101000000Z").is_none());
        assert!(at(OCTET_STRING, "700101000000Z").is_none());
    }
}
