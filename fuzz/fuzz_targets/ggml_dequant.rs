//! The block dequantizers. First byte < 0x80: a GGML type id
//! (`cersa::input::gguf::ggml::GgmlType::from_id`); the rest, trimmed to whole blocks as
//! the API requires, is dequantized: exactly blocks × block elements values, the same bits
//! whether decoded whole, in two chunks split at a block boundary (as `copy_dense` does)
//! or with the trailing partial block left on (documented as ignored).
//! First byte ≥ 0x80: the loader's CERSA factor quantizations (`cersa_loader::Quant`,
//! chosen by the byte), then a row length (2 bytes, < 1024) and whole rows:
//! `dequantize_rows`/`decode_u`/`decode_vt` must accept exactly the rows that fit and
//! give rows × length values; `quantize_row` of arbitrary f32 bits (NaN, ±Inf included)
//! must give `row_bytes` bytes that dequantize back to as many values.
#![no_main]

use cersa::input::gguf::ggml::{dequantize, GgmlType};
use cersa_loader::{FactorEncoding, Quant};
use libfuzzer_sys::fuzz_target;

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn ggml(t: GgmlType, rest: &[u8]) {
    let (elems, bsize) = t.block();
    let blocks = rest.len() / bsize;
    let whole = &rest[..blocks * bsize];
    let mut out = Vec::new();
    dequantize(t, whole, &mut out);
    assert_eq!(out.len(), blocks * elems, "{}", t.name());
    let k = blocks / 2;
    let mut parts = Vec::new();
    dequantize(t, &whole[..k * bsize], &mut parts);
    dequantize(t, &whole[k * bsize..], &mut parts);
    assert_eq!(
        bits(&parts),
        bits(&out),
        "{}: chunked decode differs",
        t.name()
    );
    let mut tail = Vec::new();
    dequantize(t, rest, &mut tail);
    assert_eq!(
        bits(&tail),
        bits(&out),
        "{}: partial block not ignored",
        t.name()
    );
}

fn loader(q: Quant, rest: &[u8]) {
    let Some((len, body)) = rest.split_first_chunk::<2>() else {
        return;
    };
    let len = (u16::from_le_bytes(*len) & 0x3ff) as usize;
    let rb = q.row_bytes(len).expect("small rows do not overflow");
    assert_eq!(rb, len.div_ceil(32) * q.block_bytes());
    let rows = if rb == 0 { body.len() } else { body.len() / rb };
    let whole = &body[..rows * rb];
    let out = q
        .dequantize_rows(whole, rows, len)
        .expect("whole rows are accepted");
    assert_eq!(out.len(), rows * len);
    if whole.len() != body.len() {
        assert!(q.dequantize_rows(body, rows, len).is_none());
        assert!(q.dequantize_rows(body, rows + 1, len).is_none());
    }
    let enc = FactorEncoding::Quant(q);
    // U [m = len, r = rows] is stored as r rows of m values; Vᵀ [r, n = len] as r rows.
    let u = enc
        .decode_u(whole, len, rows)
        .expect("decode_u of whole rows");
    assert_eq!(u.len(), rows * len);
    let vt = enc
        .decode_vt(whole, rows, len)
        .expect("decode_vt of whole rows");
    assert_eq!(bits(&vt), bits(&out));
    if let Some(row) = whole.get(..rb) {
        let mut one = Vec::new();
        q.dequantize_row(row, len, &mut one).expect("one whole row");
        assert_eq!(bits(&one), bits(&out[..len]));
    }
    // Quantizing arbitrary f32 bits.
    let values: Vec<f32> = body
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    let mut packed = Vec::new();
    q.quantize_row(&values, &mut packed);
    assert_eq!(Some(packed.len()), q.row_bytes(values.len()));
    let mut back = Vec::new();
    q.dequantize_row(&packed, values.len(), &mut back)
        .expect("a quantized row dequantizes");
    assert_eq!(back.len(), values.len());
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    if sel < 0x80 {
        if let Some(t) = GgmlType::from_id(sel.into()) {
            ggml(t, rest);
        }
    } else {
        loader(Quant::ALL[sel as usize % Quant::ALL.len()], rest);
    }
});
