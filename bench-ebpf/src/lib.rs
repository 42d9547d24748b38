#![no_std]
// Empty on purpose: xtask lists this crate as a build-dependency (with its
// `bench` feature) so that cargo rebuilds the bench programs whenever their
// sources or `splitter-common` change.
