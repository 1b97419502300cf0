//! Brig's images: where an image comes from ([`Source`]), pulling it into the [`Store`] (from
//! a registry with `oci-client`, or from an OCI layout or archive), and unpacking its layers
//! so that no entry of a layer can write outside it ([`unpack`]).
//!
//! Containers get an overlay of an image's layers (see `brig_runtime::rootfs`), so two
//! containers of one image never see each other's writes and the image stays intact.

// Registry and layer values are narrowed by checked conversions, never by `as`.
#![cfg_attr(not(test), warn(clippy::cast_possible_truncation))]

pub mod auth;
pub mod pull;
pub mod source;
pub mod store;
pub mod unpack;

pub use pull::{Progress, PullEvent, PullOptions};
pub use source::Source;
pub use store::{ImageDefaults, ImageRecord, Store, StoreError};
