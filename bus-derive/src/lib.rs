//! `#[derive(Message)]` for bus-core: gives a type its MassTransit message URN.
//!
//! Use it through `bus_core::Message`; see that trait for the attributes.

#![warn(clippy::print_stdout)]
#![doc(test(attr(deny(warnings))))]

use proc_macro::TokenStream;
use quote::quote;
use syn::punctuated::Punctuated;
use syn::{parse_macro_input, DeriveInput, Expr, ExprLit, Lit, LitStr, Meta, Token};

/// Implements `bus_core::Message` for a serde type.
///
/// Attributes (all optional), inside `#[message(...)]`:
/// - `urn = "urn:message:Ns:Type"`: the full URN;
/// - `namespace = "Ns"`: the namespace, the URN being `urn:message:{namespace}:{TypeName}`
///   (default namespace: the crate's name);
/// - `implements("urn:message:Ns:Contract", ...)`: further contract URNs the message carries;
/// - `correlation_id = "field"`: a `Uuid` (or `Option<Uuid>`) field used as the envelope's `correlationId`;
/// - `protobuf`: the type is also a `prost::Message`, so the protobuf serializer can carry it.
#[proc_macro_derive(Message, attributes(message))]
pub fn derive_message(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match expand(&input) {
        Ok(tokens) => tokens.into(),
        Err(err) => err.to_compile_error().into(),
    }
}

fn expand(input: &DeriveInput) -> syn::Result<proc_macro2::TokenStream> {
    let mut urn: Option<LitStr> = None;
    let mut namespace: Option<LitStr> = None;
    let mut implements: Vec<LitStr> = Vec::new();
    let mut correlation: Option<syn::Ident> = None;
    let mut protobuf = false;

    for attr in input.attrs.iter().filter(|a| a.path().is_ident("message")) {
        let items = attr.parse_args_with(Punctuated::<Meta, Token![,]>::parse_terminated)?;
        for item in items {
            match item {
                Meta::NameValue(nv) if nv.path.is_ident("urn") => urn = Some(string_literal(&nv.value)?),
                Meta::NameValue(nv) if nv.path.is_ident("namespace") => namespace = Some(string_literal(&nv.value)?),
                Meta::NameValue(nv) if nv.path.is_ident("correlation_id") => {
                    let lit = string_literal(&nv.value)?;
                    correlation = Some(syn::Ident::new(&lit.value(), lit.span()));
                }
                Meta::Path(path) if path.is_ident("protobuf") => protobuf = true,
                Meta::List(list) if list.path.is_ident("implements") => {
                    let lits = list.parse_args_with(Punctuated::<Expr, Token![,]>::parse_terminated)?;
                    for lit in &lits {
                        implements.push(string_literal(lit)?);
                    }
                }
                other => return Err(syn::Error::new_spanned(
                    other,
                    "unknown message attribute; expected urn, namespace, implements(..), correlation_id or protobuf",
                )),
            }
        }
    }

    let name = &input.ident;
    let type_name = name.to_string();
    let own_urn = match (urn, namespace) {
        (Some(urn), _) => {
            if !urn.value().starts_with("urn:message:") {
                return Err(syn::Error::new(urn.span(), "a message URN starts with `urn:message:`"));
            }
            quote!(#urn)
        }
        (None, Some(ns)) => {
            let full = format!("urn:message:{}:{}", ns.value(), type_name);
            quote!(#full)
        }
        (None, None) => quote!(concat!("urn:message:", env!("CARGO_CRATE_NAME"), ":", #type_name)),
    };
    let correlation_fn = correlation.map(|field| {
        quote! {
            fn correlation_id(&self) -> ::core::option::Option<::bus_core::__private::Uuid> {
                ::bus_core::__private::ToCorrelationId::to_correlation_id(&self.#field)
            }
        }
    });
    let protobuf_fns = protobuf.then(|| {
        quote! {
            fn to_protobuf(&self) -> ::core::option::Option<::std::vec::Vec<u8>> {
                ::core::option::Option::Some(::bus_core::__private::prost::Message::encode_to_vec(self))
            }
            fn from_protobuf(bytes: &[u8]) -> ::core::option::Option<Self> {
                <Self as ::bus_core::__private::prost::Message>::decode(bytes).ok()
            }
        }
    });
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    Ok(quote! {
        impl #impl_generics ::bus_core::Message for #name #ty_generics #where_clause {
            fn message_types() -> &'static [&'static str] {
                const TYPES: &[&str] = &[#own_urn #(, #implements)*];
                TYPES
            }
            #correlation_fn
            #protobuf_fns
        }
    })
}

fn string_literal(expr: &Expr) -> syn::Result<LitStr> {
    match expr {
        Expr::Lit(ExprLit { lit: Lit::Str(s), .. }) => Ok(s.clone()),
        other => Err(syn::Error::new_spanned(other, "expected a string literal")),
    }
}
