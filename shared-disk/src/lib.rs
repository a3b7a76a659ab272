//! shared-disk: block storage shared by the primary and backup hosts, its
//! server, test-and-set go-live arbitration and fencing. (Not built yet.)
