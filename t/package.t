#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# `make deb` builds libnginx-mod-http-civicgate the Debian way: the module
# where Debian's nginx looks for modules, its load snippet, the docs and
# examples, maintainer scripts that enable it in /etc/nginx/modules-enabled,
# and a dependency on the nginx ABI it was built against.  The packaged
# module serves requests in the system nginx.  As root the package is
# installed with dpkg, used through its modules-enabled link, and purged:
# the system is left as it was found.  Where the package is already
# installed, that part is skipped and the package left as it is; a last
# part checks this by installing the package first and running this test
# again.
#
# CIVICGATE_DEB=file.deb tests that package instead of building one;
# CIVICGATE_TEST_INSTALL=0 leaves out the install even as root.

use strict;
use warnings;

use Cwd qw(abs_path);
use FindBin;
use POSIX ();
use lib "$FindBin::Bin/lib";
use Test::More;
use Civicgate::Test qw(:all);

my $top  = abs_path("$FindBin::Bin/..");
my $pkg  = 'libnginx-mod-http-civicgate';
my $so   = 'usr/lib/nginx/modules/ngx_http_civicgate_module.so';
my $snip = 'usr/share/nginx/modules-available/mod-http-civicgate.conf';
my $link = '/etc/nginx/modules-enabled/50-mod-http-civicgate.conf';
my $doc  = "usr/share/doc/$pkg";
my $abi_file = '/usr/share/nginx/src/debian/libnginx-mod.abisubstvars';

unless ($> == 0 || $ENV{CIVICGATE_DEB}) {
    for my $tool (qw(dpkg-buildpackage dh_nginx)) {
        plan skip_all => "$tool not found (make deb installs it as root)"
            unless grep { -x "$_/$tool" } split /:/, $ENV{PATH} // '';
    }
}

my $t = Civicgate::Test->new(redis => 0);
my $top_dir = $t->topdir;

# runs @cmd with its output in $log (appended), killed after $limit s;
# returns the exit code
sub run_logged {
    my ($log, $limit, @cmd) = @_;
    my $pid = fork // die "fork: $!";
    if ($pid == 0) {
        open STDIN, '<', '/dev/null';
        open STDOUT, '>>', $log or POSIX::_exit(126);
        open STDERR, '>&', \*STDOUT or POSIX::_exit(126);
        { exec 'timeout', '-k', '10', $limit, @cmd; }
        POSIX::_exit(127);
    }
    waitpid $pid, 0;
    return $? >> 8;
}

sub tail_of {
    my ($file, $n) = @_;
    my @l = split /\n/, $t->read_file($file) // '';
    return join "\n", @l[($#l >= $n ? $#l - $n + 1 : 0) .. $#l];
}

sub output_of {
    my (@cmd) = @_;
    open my $fh, '-|', @cmd or die "$cmd[0]: $!";
    local $/;
    my $out = <$fh> // '';
    close $fh;
    return wantarray ? ($out, $? >> 8) : $out;
}

sub read_text {
    my ($path) = @_;
    open my $fh, '<', $path or return undef;
    local $/;
    return <$fh>;
}

# "install ok installed", "deinstall ok config-files", ... or '' when dpkg
# does not know the package
sub dpkg_status {
    my ($out, $rc) = output_of('sh', '-c',
        "dpkg-query -W -f '\${Status}' $pkg 2>/dev/null");
    return $rc == 0 && $out !~ /not-installed/ ? $out : '';
}

###########################################################################
# build

my $version = output_of('dpkg-parsechangelog', '-l', "$top/debian/changelog",
    '-S', 'Version');
chomp $version;
like($version, qr/^\d[\w.+~]*-\w[\w.+~]*$/,
    "debian/changelog version $version has a Debian revision");
my $arch = output_of('dpkg', '--print-architecture');
chomp $arch;

my $deb = $ENV{CIVICGATE_DEB};
unless ($deb) {
    # make deb removes build/deb first: no older package can pass for new
    my $rc = run_logged("$top_dir/make-deb.log", 900,
        'make', '-s', '-C', $top, 'deb');
    is($rc, 0, 'make deb') or diag(tail_of("$top_dir/make-deb.log", 40));
    $deb = "$top/build/deb/${pkg}_${version}_${arch}.deb";
}
ok(-f $deb, "package built: $deb") or do {
    $t->done_testing;
    exit;
};

###########################################################################
# metadata and contents

my %f;
for my $field (qw(Package Source Version Architecture Depends Description)) {
    $f{$field} = output_of('dpkg-deb', '-f', $deb, $field);
    chomp $f{$field};
}
is($f{Package}, $pkg, 'binary package name');
is($f{Source}, 'civicgate', 'source package name');
is($f{Version}, $version, 'version from debian/changelog');
is($f{Architecture}, $arch, 'architecture');
for my $what ('rate limits', 'consent', 'status', 'Server-Sent Events',
    'Prometheus', 'health check')
{
    like($f{Description}, qr/\Q$what\E/, "the description names $what");
}

my ($abi) = (read_text($abi_file) // '') =~ /^nginx:abi=(\S+)/m;
ok(defined $abi, "nginx ABI read from nginx-dev ($abi_file)");
my @deps = map { s/^\s+|\s+$//gr } split /,/, $f{Depends};
ok((grep { $_ eq $abi } @deps), "Depends on the nginx ABI ($abi)")
    or diag("Depends: $f{Depends}");
like($f{Depends}, qr/\blibhiredis[\w.]* \(/, 'Depends on hiredis (shlibs)');
like($f{Depends}, qr/\blibjansson\d+ \(/, 'Depends on jansson (shlibs)');

my %files;
for (split /\n/, output_of('dpkg-deb', '-c', $deb)) {
    my ($path) = m{ \./(\S*?)/?(?: -> \S+)?$} or next;
    $files{$path} = 1 if length $path;
}
ok($files{$so}, "module in /$so");
ok($files{$snip}, "load snippet in /$snip");
is_deeply([ grep { !m{^usr(/|$)} } sort keys %files ], [],
    'every file under /usr (the modules-enabled link is made by postinst)');

# docs/*.md and examples/* as in the source tree; large ones gzipped
my @want = ('README.md',
    map({ s{^\Q$top\E/}{}r } glob("$top/docs/*.md")),
    map({ s{^\Q$top\E/}{}r } glob("$top/examples/*")));
ok(@want > 5, 'docs and examples found in the source tree');
for my $w (@want) {
    ok($files{"$doc/$w"} || $files{"$doc/$w.gz"}, "/$doc/$w");
}
ok($files{"$doc/copyright"}, 'copyright');
ok($files{"$doc/changelog.Debian.gz"}, 'changelog.Debian.gz');

my $root = "$top_dir/root";
is(run_logged("$top_dir/dpkg-deb.log", 60, 'dpkg-deb', '-x', $deb, $root),
    0, 'dpkg-deb -x');
is(read_text("$root/$snip"),
    "load_module modules/ngx_http_civicgate_module.so;\n",
    'the snippet loads the module from nginx\'s modules directory');
like(read_text("$root/$doc/copyright") // '', qr/^License: BSD-2-Clause$/m,
    'copyright: BSD-2-Clause');

my $ctrl = "$top_dir/control";
is(run_logged("$top_dir/dpkg-deb.log", 60, 'dpkg-deb', '-e', $deb, $ctrl),
    0, 'dpkg-deb -e');
my $pair = 'mod-http-civicgate.conf:50-mod-http-civicgate.conf';
like(read_text("$ctrl/postinst") // '', qr/\Q$pair\E/,
    'postinst links the snippet into modules-enabled');
like(read_text("$ctrl/postrm") // '', qr/\Q$pair\E/,
    'postrm removes the link on purge');

###########################################################################
# the packaged module in the system nginx

my $key = random_key_hex(32);

# a journey ID on every answer, a fixed channel: needs no Redis
my $http = <<'EOF';
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_channels web sms counter;
    server {
        listen 127.0.0.1:%%PORT_0%%;
        location / {
            civicgate_journey on;
            civicgate_channel counter;
            return 200 "channel=$civicgate_channel\n";
        }
    }
EOF

sub serves {
    my ($n, $what) = @_;
    my ($rc, $out) = $n->test_config;
    is($rc, 0, "$what: nginx -t") or diag($out);
    $n->run;
    my $r = $n->request('/');
    is($r->status, 200, "$what: request answered");
    is($r->body, "channel=counter\n", "$what: civicgate variable");
    ok(defined verify_journey_id($r->header('X-Journey-ID') // '', $key),
        "$what: signed journey ID");
    $n->stop;
}

$t->write_secret_file('keys', [ [ k1 => $key ] ]);
$t->write_nginx_conf($http, load_module => 0,
    main => "load_module $root/$so;");
serves($t, 'extracted package');

###########################################################################
# install, use through modules-enabled, purge

subtest 'installed with dpkg, enabled, purged' => sub {
    plan skip_all => 'not root: installing the package needs root'
        . ' (CI runs the tests as root)' if $> != 0;
    plan skip_all => 'CIVICGATE_TEST_INSTALL=0'
        if defined $ENV{CIVICGATE_TEST_INSTALL}
            && !$ENV{CIVICGATE_TEST_INSTALL};
    my $before = dpkg_status();
    plan skip_all => "$pkg is already known to dpkg ($before): left alone"
        if $before;
    plan skip_all => "$link exists: left alone" if -e $link || -l $link;

    local $ENV{DEBIAN_FRONTEND} = 'noninteractive';
    my $log = "$top_dir/dpkg.log";

    # no service is started or reloaded (the nginx-reload trigger)
    my $policy = '/usr/sbin/policy-rc.d';
    my $own_policy = 0;
    unless (-e $policy) {
        open my $fh, '>', $policy or die "$policy: $!";
        print $fh "#!/bin/sh\nexit 101\n";
        close $fh;
        chmod 0755, $policy;
        $own_policy = 1;
    }

    my $n = $t->nginx('installed');
    my $ok = eval {
        my $rc = run_logged($log, 300, 'dpkg', '-i', $deb);
        is($rc, 0, 'dpkg -i') or diag(tail_of($log, 30));
        like(dpkg_status(), qr/^install ok installed$/, 'installed');
        ok(-f "/$so", "/$so");
        is(readlink($link), "/$snip", "$link -> /$snip");

        # the snippet names modules/ under nginx's prefix; Debian's prefix
        # /usr/share/nginx has the same link
        symlink '/usr/lib/nginx/modules', $n->testdir . '/modules'
            or die "symlink: $!";
        $n->write_secret_file('keys', [ [ k1 => $key ] ]);
        $n->write_nginx_conf($http, load_module => 0,
            main => "include $link;");
        serves($n, 'installed package');
        1;
    };
    my $err = $@;
    $n->stop if $n->pid;

    if (dpkg_status()) {
        my $rc = run_logged($log, 300, 'dpkg', '--purge', $pkg);
        is($rc, 0, 'dpkg --purge') or diag(tail_of($log, 30));
    }
    unlink $policy if $own_policy;

    is(dpkg_status(), '', 'purged');
    ok(!-e "/$so", "/$so removed");
    ok(!-l $link && !-l "$link.removed", 'modules-enabled link removed');
    die $err unless $ok;
};

###########################################################################
# a package the administrator installed is left as it was

subtest 'an installed package is left alone' => sub {
    plan skip_all => 'not root' if $> != 0;
    plan skip_all => 'CIVICGATE_TEST_INSTALL=0'
        if defined $ENV{CIVICGATE_TEST_INSTALL}
            && !$ENV{CIVICGATE_TEST_INSTALL};
    plan skip_all => 'run by this test itself' if $ENV{CIVICGATE_TEST_NESTED};
    plan skip_all => "$pkg is already known to dpkg" if dpkg_status();

    local $ENV{DEBIAN_FRONTEND} = 'noninteractive';
    my $log = "$top_dir/dpkg-before.log";
    my $policy = '/usr/sbin/policy-rc.d';
    my $own_policy = !-e $policy;
    if ($own_policy) {
        open my $fh, '>', $policy or die "$policy: $!";
        print $fh "#!/bin/sh\nexit 101\n";
        close $fh;
        chmod 0755, $policy;
    }

    # as the administrator would have it: installed, and enabled
    is(run_logged($log, 300, 'dpkg', '-i', $deb), 0, 'installed first')
        or diag(tail_of($log, 30));
    my $state = sub {
        join ' ', dpkg_status(), readlink($link) // 'no link',
            output_of('sh', '-c', "md5sum /$so 2>&1");
    };
    my $before = $state->();

    # this test again, on the installed system
    my $nested = "$top_dir/nested.log";
    my $rc = do {
        local $ENV{CIVICGATE_DEB} = $deb;
        local $ENV{CIVICGATE_TEST_NESTED} = 1;
        run_logged($nested, 300, $^X, "$FindBin::Bin/package.t");
    };
    is($rc, 0, 't/package.t on a system with the package installed')
        or diag(tail_of($nested, 30));
    like($t->read_file($nested) // '', qr/# SKIP .*: left alone/,
        'it skips the installation');
    is($state->(), $before, 'the package, its link and module are as before');

    is(run_logged($log, 300, 'dpkg', '--purge', $pkg), 0, 'purged again')
        or diag(tail_of($log, 30));
    unlink $policy if $own_policy;
};

$t->done_testing;
