#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Every directive and variable the module declares has its entry in docs/:
# a "### name" section in directives.md or variables.md.

use strict;
use warnings;

use FindBin;
use Test::More;

my $top = "$FindBin::Bin/..";

my %names;
for my $file (glob "$top/module/*.c") {
    open my $fh, '<', $file or die "$file: $!";
    local $/;
    my $src = <$fh>;
    $names{$1} = 1 while $src =~ /ngx_string\("(civicgate_[a-z0-9_]+)"\)/g;
}

ok(scalar(keys %names) > 20, 'directives and variables found in module/');

my $docs = '';
for my $file ("$top/docs/directives.md", "$top/docs/variables.md") {
    open my $fh, '<', $file or die "$file: $!";
    local $/;
    $docs .= <$fh>;
}

for my $name (sort keys %names) {
    like($docs, qr/^###\s+\$?\Q$name\E\s*$/m, "$name is documented");
}

done_testing;
