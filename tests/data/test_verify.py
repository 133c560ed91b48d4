"""`python -m unimoe.data verify`: downloads checked against published sizes and sha256."""

import hashlib
import pathlib

from tensorflow_datasets.core.download import checksums

from unimoe.data import check, verify


def _line(url: str, data: bytes, name: str) -> str:
    return f'{url}\t{len(data)}\t{hashlib.sha256(data).hexdigest()}\t{name}\n'


def test_verify_reports_ok_mismatch_missing_and_records_the_rest(tmp_path: pathlib.Path, capsys):
    downloads = tmp_path / 'downloads'
    (downloads / 'nested').mkdir(parents=True)
    (downloads / 'good.zip').write_bytes(b'good bytes')
    (downloads / 'nested' / 'bad.tar.gz').write_bytes(b'corrupted')
    (downloads / 'nested' / 'unlisted.json').write_bytes(b'{"a": 1}')
    table = tmp_path / 'table.tsv'
    table.write_text(
        '# comment\n'
        + _line('http://x/good.zip', b'good bytes', 'good.zip')
        + _line('http://x/bad.tar.gz', b'original', 'bad.tar.gz')
        + _line('http://x/absent.zip', b'whatever', 'absent.zip')
    )
    statuses, others = verify.verify_dir(downloads, table)
    assert {s.filename: s.status for s in statuses} == {
        'good.zip': 'ok',
        'bad.tar.gz': 'mismatch',
        'absent.zip': 'missing',
    }
    assert [p.name for p in others] == ['unlisted.json']

    mine = tmp_path / 'mine.tsv'
    code = check.main(['verify', str(downloads), '--checksums', str(table), '--record', str(mine)])
    out = capsys.readouterr().out
    assert code == 1
    assert 'mismatch bad.tar.gz' in out and 'http://x/bad.tar.gz' in out
    assert '2 of 3 listed files present: 1 ok, 1 mismatched; 1 files not listed' in out
    recorded = checksums.load_url_infos(mine)
    assert recorded['nested/unlisted.json'].checksum == hashlib.sha256(b'{"a": 1}').hexdigest()
    # The recorded table verifies the same files on another machine.
    assert check.main(['verify', str(downloads), '--checksums', str(mine)]) == 0


def test_verify_of_a_missing_directory_says_so(tmp_path: pathlib.Path, capsys):
    assert check.main(['verify', str(tmp_path / 'nowhere')]) == 2
    assert 'is not a directory' in capsys.readouterr().out


def test_shipped_table_parses_and_names_the_coco_and_librispeech_archives():
    infos = checksums.load_url_infos(verify.DEFAULT_TABLE)
    names = {info.filename for info in infos.values()}
    assert {'train2014.zip', 'val2014.zip', 'train-clean-100.tar.gz'} <= names
    assert all(len(info.checksum) == 64 and int(info.size) > 0 for info in infos.values())
