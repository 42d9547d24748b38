#![no_std]
// Empty on purpose: splitter-user lists this crate as a build-dependency so
// that cargo rebuilds the kernel program whenever its sources change.
