"""The error catalog of the batch-connection contract, in two languages.

Every failure `probe` reports carries one `ErrorCode`. Request-level codes
(``DRS.M*``) describe the request itself; per-endpoint codes (``DRS.C*``)
describe what happened on the wire.

Exception family (flat on purpose)::

    ProbeFailure        one endpoint failed; carries an ErrorCode, the target and a cause
    RequestInvalid      the request (or one job of it) is invalid; carries an ErrorCode and a field

Messages are built from templates and the few parameters a failure carries
(target ``host:port``, field path, a short cause). A cause that came from a
driver is passed through `scrub()` first, so no password reaches a message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

Language = Literal["en-us", "zh-cn"]
LANGUAGES: tuple[Language, ...] = ("en-us", "zh-cn")


def language(value: str | None) -> Language:
    """The message language for a request header or flag; anything unknown is en-us."""
    v = (value or "").strip().lower()
    return "zh-cn" if v == "zh-cn" else "en-us"


class ErrorCode(StrEnum):
    # request level
    INVALID_TOKEN = "DRS.M00100"
    PROJECT_FORBIDDEN = "DRS.M00102"
    MALFORMED_BODY = "DRS.M00200"
    PARAMETER_EMPTY = "DRS.M00201"
    PARAMETER_INVALID = "DRS.M00202"
    INVALID_PROJECT_ID = "DRS.M00261"
    TASK_NOT_FOUND = "DRS.10000010"
    # per endpoint
    DNS_FAILURE = "DRS.C10010"
    NETWORK_UNREACHABLE = "DRS.C10011"
    CONNECTION_REFUSED = "DRS.C10012"
    CONNECT_TIMEOUT = "DRS.C10013"
    CONNECTION_RESET = "DRS.C10014"
    HANDSHAKE_TIMEOUT = "DRS.C10015"
    PROTOCOL_MISMATCH = "DRS.C10016"
    NETWORK_POLICY_DENIED = "DRS.C10017"
    SSL_CERT_INVALID = "DRS.C10020"
    SSL_CHECKSUM_MISMATCH = "DRS.C10021"
    SSL_HANDSHAKE_FAILED = "DRS.C10022"
    SSL_VERIFY_FAILED = "DRS.C10023"
    SSL_NOT_ENABLED_ON_SERVER = "DRS.C10024"
    SSL_REQUIRED_BY_SERVER = "DRS.C10025"
    AUTH_FAILED = "DRS.C10030"
    AUTH_METHOD_UNSUPPORTED = "DRS.C10031"
    DATABASE_NOT_FOUND = "DRS.C10032"
    ACCESS_DENIED = "DRS.C10033"
    TOO_MANY_CONNECTIONS = "DRS.C10034"
    SERVER_UNAVAILABLE = "DRS.C10035"
    NO_REACHABLE_MEMBER = "DRS.C10036"
    TASK_STATUS_INVALID = "DRS.C10050"
    DR_FORWARD_NOT_READY = "DRS.C10051"
    PARENT_TASK_NOT_ALLOWED = "DRS.C10052"
    INTERNAL = "DRS.C10099"


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    http_status: int  # for request-level codes; 200 for per-endpoint ones
    en: str
    zh: str


# Templates may use {target} (host:port), {field} (a parameter path) and {cause}
# (a short, already scrubbed explanation). Unused parameters are simply ignored.
CATALOG: dict[ErrorCode, CatalogEntry] = {
    ErrorCode.INVALID_TOKEN: CatalogEntry(
        401, "The token is missing or invalid.", "Token 缺失或无效。"
    ),
    ErrorCode.PROJECT_FORBIDDEN: CatalogEntry(
        403,
        "The token is not allowed to access this project.",
        "该 Token 无权访问此项目。",
    ),
    ErrorCode.MALFORMED_BODY: CatalogEntry(
        400,
        "Parameter error: the request body is malformed{cause}.",
        "参数错误：请求体格式错误{cause}。",
    ),
    ErrorCode.PARAMETER_EMPTY: CatalogEntry(
        400, "The parameter {field} is empty.", "参数 {field} 为空。"
    ),
    ErrorCode.PARAMETER_INVALID: CatalogEntry(
        400,
        "The value of parameter {field} is invalid{cause}.",
        "参数 {field} 的值无效{cause}。",
    ),
    ErrorCode.INVALID_PROJECT_ID: CatalogEntry(
        403, "Invalid project ID.", "项目 ID 无效。"
    ),
    ErrorCode.TASK_NOT_FOUND: CatalogEntry(
        200, "Task {field} was not found.", "任务 {field} 不存在。"
    ),
    ErrorCode.DNS_FAILURE: CatalogEntry(
        200,
        "Cannot resolve the host name of {target}{cause}. Check the address.",
        "无法解析 {target} 的主机名{cause}，请检查地址。",
    ),
    ErrorCode.NETWORK_UNREACHABLE: CatalogEntry(
        200,
        "No route to {target}: the network is unreachable from here. "
        "Check routing, the VPC/VPN and security groups.",
        "无法路由到 {target}：网络不可达。请检查路由、VPC/VPN 和安全组。",
    ),
    ErrorCode.CONNECTION_REFUSED: CatalogEntry(
        200,
        "Connection to {target} was refused: nothing listens on that port. "
        "Check the port and that the database is running.",
        "连接 {target} 被拒绝：该端口没有服务监听。请检查端口以及数据库是否在运行。",
    ),
    ErrorCode.CONNECT_TIMEOUT: CatalogEntry(
        200,
        "No TCP answer from {target}{cause}. Check the address, firewalls and "
        "security groups.",
        "{target} 没有 TCP 响应{cause}。请检查地址、防火墙和安全组。",
    ),
    ErrorCode.CONNECTION_RESET: CatalogEntry(
        200,
        "{target} closed the connection during the handshake{cause}.",
        "{target} 在握手期间关闭了连接{cause}。",
    ),
    ErrorCode.HANDSHAKE_TIMEOUT: CatalogEntry(
        200,
        "{target} accepted the TCP connection but did not complete the "
        "handshake in time{cause}.",
        "{target} 接受了 TCP 连接，但未在规定时间内完成握手{cause}。",
    ),
    ErrorCode.PROTOCOL_MISMATCH: CatalogEntry(
        200,
        "The service at {target} does not speak the expected database protocol{cause}. "
        "Check the port and the database type.",
        "{target} 上的服务不是预期的数据库协议{cause}。请检查端口和数据库类型。",
    ),
    ErrorCode.NETWORK_POLICY_DENIED: CatalogEntry(
        200,
        "Connecting to {target} is not allowed by the network policy.",
        "网络策略不允许连接 {target}。",
    ),
    ErrorCode.SSL_CERT_INVALID: CatalogEntry(
        200,
        "The SSL certificate given for {target} is invalid{cause}.",
        "为 {target} 提供的 SSL 证书无效{cause}。",
    ),
    ErrorCode.SSL_CHECKSUM_MISMATCH: CatalogEntry(
        200,
        "The SHA-256 checksum of the SSL certificate given for {target} does not match "
        "ssl_cert_check_sum.",
        "为 {target} 提供的 SSL 证书的 SHA-256 校验值与 ssl_cert_check_sum 不一致。",
    ),
    ErrorCode.SSL_HANDSHAKE_FAILED: CatalogEntry(
        200,
        "The SSL handshake with {target} failed{cause}.",
        "与 {target} 的 SSL 握手失败{cause}。",
    ),
    ErrorCode.SSL_VERIFY_FAILED: CatalogEntry(
        200,
        "The server certificate of {target} could not be verified with the given "
        "certificate{cause}.",
        "无法使用所提供的证书验证 {target} 的服务器证书{cause}。",
    ),
    ErrorCode.SSL_NOT_ENABLED_ON_SERVER: CatalogEntry(
        200,
        "SSL is requested but the server at {target} does not offer SSL.",
        "已要求 SSL 连接，但 {target} 上的服务器未开启 SSL。",
    ),
    ErrorCode.SSL_REQUIRED_BY_SERVER: CatalogEntry(
        200,
        "The server at {target} requires SSL: set ssl_link to true and provide "
        "its certificate.",
        "{target} 上的服务器要求 SSL 连接：请将 ssl_link 设为 true 并提供证书。",
    ),
    ErrorCode.AUTH_FAILED: CatalogEntry(
        200,
        "Authentication failed at {target}: check the user name and password{cause}.",
        "{target} 认证失败：请检查用户名和密码{cause}。",
    ),
    ErrorCode.AUTH_METHOD_UNSUPPORTED: CatalogEntry(
        200,
        "The server at {target} asks for an authentication method this client "
        "does not support{cause}.",
        "{target} 上的服务器要求的认证方式不受支持{cause}。",
    ),
    ErrorCode.DATABASE_NOT_FOUND: CatalogEntry(
        200,
        "The database does not exist at {target}{cause}.",
        "{target} 上不存在该数据库{cause}。",
    ),
    ErrorCode.ACCESS_DENIED: CatalogEntry(
        200,
        "Access denied at {target}: the account may not connect from here or "
        "lacks the privilege{cause}.",
        "{target} 拒绝访问：该账号不允许从此处连接或缺少权限{cause}。",
    ),
    ErrorCode.TOO_MANY_CONNECTIONS: CatalogEntry(
        200,
        "The server at {target} refuses new connections: its connection limit is reached.",
        "{target} 上的服务器拒绝新连接：已达到连接数上限。",
    ),
    ErrorCode.SERVER_UNAVAILABLE: CatalogEntry(
        200,
        "The server at {target} is not available{cause}.",
        "{target} 上的服务器不可用{cause}。",
    ),
    ErrorCode.NO_REACHABLE_MEMBER: CatalogEntry(
        200,
        "No member of the MongoDB host list {target} could be reached{cause}.",
        "无法连接 MongoDB 地址列表 {target} 中的任何成员{cause}。",
    ),
    ErrorCode.TASK_STATUS_INVALID: CatalogEntry(
        200,
        "Task {field} is not in status CONFIGURATION{cause}.",
        "任务 {field} 不处于 CONFIGURATION 状态{cause}。",
    ),
    ErrorCode.DR_FORWARD_NOT_READY: CatalogEntry(
        200,
        "The backward task {field} can be tested only while its forward task is "
        "INCRE_TRANSFER_STARTED{cause}.",
        "反向任务 {field} 只能在正向任务处于 INCRE_TRANSFER_STARTED 状态时测试{cause}。",
    ),
    ErrorCode.PARENT_TASK_NOT_ALLOWED: CatalogEntry(
        200,
        "Task {field} is a parent task and cannot be tested.",
        "任务 {field} 是父任务，不能进行连接测试。",
    ),
    ErrorCode.INTERNAL: CatalogEntry(
        200,
        "An internal error occurred while testing {target}.",
        "测试 {target} 时发生内部错误。",
    ),
}


# zh-cn for the causes probe writes itself; what a driver or a server said stays as it came.
_ZH_CAUSES: dict[str, str] = {
    # request validation
    "empty": "为空",
    "too long": "过长",
    "1-64 characters of A-Z a-z 0-9 _ -": "应为 1-64 个字符（A-Z a-z 0-9 _ -）",
    "contains a NUL character": "包含 NUL 字符",
    "must be 0 for MongoDB: ports go in ip": "MongoDB 必须为 0：端口写在 ip 中",
    "must be from 1 to 65535": "必须在 1 到 65535 之间",
    "required when ssl_link is true": "ssl_link 为 true 时必填",
    "must be 64 hexadecimal characters (SHA-256)": "必须是 64 个十六进制字符（SHA-256）",
    "not valid Unicode text": "不是合法的 Unicode 文本",
    "must be an object": "必须是对象",
    "expected a JSON object": "应为 JSON 对象",
    "it is not UTF-8": "不是 UTF-8 编码",
    "it is empty": "为空",
    "nested too deeply": "嵌套层数过多",
    "a number JSON does not allow, or too long to read": "包含 JSON 不允许的数字，或数字过长",
    "must be an array": "必须是数组",
    "input should be a valid string": "应为字符串",
    "input should be a valid integer": "应为整数",
    "input should be a valid boolean": "应为布尔值",
    "input should be a valid dictionary": "应为对象",
    "input should be a valid list": "应为数组",
    "empty host": "主机为空",
    "not a valid IPv4 address": "不是合法的 IPv4 地址",
    "not a valid IPv6 address": "不是合法的 IPv6 地址",
    "not a valid IP address or host name": "不是合法的 IP 地址或主机名",
    "port must be a number from 1 to 65535": "端口必须是 1 到 65535 之间的数字",
    "ip holds a port; put the port in db_port": "ip 中包含端口；请把端口填在 db_port 中",
    "empty entry in the host list": "主机列表中有空项",
    "more than 64 hosts": "主机超过 64 个",
    # certificate material
    "larger than 500 KiB": "超过 500 KiB",
    "ssl_cert_key is not valid base64": "ssl_cert_key 不是合法的 base64",
    "the PEM file holds no readable certificate": "PEM 文件中没有可读取的证书",
    "not a PKCS#12 file, or the ssl_cert_password is wrong":
        "不是 PKCS#12 文件，或 ssl_cert_password 错误",
    "not a PKCS#12 file, or it needs an ssl_cert_password, which is not given":
        "不是 PKCS#12 文件，或需要 ssl_cert_password 但未提供",
    "the PKCS#12 file holds no certificate": "PKCS#12 文件中没有证书",
    "not a PEM, DER or PKCS#12 certificate": "不是 PEM、DER 或 PKCS#12 格式的证书",
    "the certificate cannot be used as a CA": "该证书不能用作 CA",
    # the network and the servers
    "timed out": "超时",
    "the batch deadline passed before the probe started": "探测开始前批次已到期",
    "no such host": "主机不存在",
    "temporary failure in name resolution": "域名解析暂时失败",
    "resolver error": "域名解析出错",
    "connection closed by the server": "连接被服务器关闭",
    "the server speaks TLS from the first byte on this port": "该端口从第一个字节起即使用 TLS",
    "the greeting is not a MySQL greeting": "问候报文不是 MySQL 格式",
    "the server accepted TCP but sent no greeting": "服务器接受了 TCP 连接，但没有发送问候报文",
    "the server's greeting could not be read as MySQL": "无法按 MySQL 协议解析服务器的问候报文",
    "the member answers but is neither primary nor secondary":
        "该成员有应答，但既不是主节点也不是从节点",
    "the server closed the connection without answering the MongoDB hello: it is not "
    "MongoDB, or it requires TLS (then set ssl_link to true)":
        "服务器未应答 MongoDB hello 就关闭了连接：它不是 MongoDB，或者要求 TLS"
        "（此时请将 ssl_link 设为 true）",
    "the server completed the TLS handshake, then closed the connection without answering "
    "the MongoDB hello: it is not MongoDB":
        "服务器完成了 TLS 握手，随后未应答 MongoDB hello 就关闭了连接：它不是 MongoDB",
    "the server closed the connection without answering the MongoDB hello, and it does not "
    "speak TLS either": "服务器未应答 MongoDB hello 就关闭了连接，并且它也不使用 TLS",
    "; or, on MariaDB, the server requires SSL (it reports that the same way): "
    "then set ssl_link to true":
        "；或者（MariaDB）服务器要求 SSL（它以同样的方式报告）：此时请将 ssl_link 设为 true",
}
_ZH_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), zh) for pattern, zh in (
        (r"one of (.+)", r"应为以下之一：\1"),
        (r"longer than (\d+) characters", r"超过 \1 个字符"),
        (r"not JSON at line (\d+), column (\d+)", r"不是合法的 JSON（第 \1 行第 \2 列）"),
        (r"no answer within (\S+) s", r"\1 秒内无应答"),
        (r"cut by the batch deadline \(--batch-timeout\) after (\S+) s",
         r"\1 秒后被批次截止时间（--batch-timeout）中断"),
        (r"waited (\S+) s", r"已等待 \1 秒"),
        (r"an? (\w+) server answers on this port", r"该端口上是 \1 服务"),
        (r"the server's answer is not (\w+)", r"服务器的应答不是 \1 协议"),
        (r"the server sent nothing for (\S+) s, then something that is not a MySQL greeting",
         r"服务器 \1 秒内没有发送任何内容，之后发送的也不是 MySQL 问候报文"),
        (r"no listed host resolves or is allowed \((\S+)\)",
         r"列出的主机都无法解析或不被允许（\1）"),
        (r"tried (.+)", r"已尝试 \1"),
        (r"the listed hosts answered, then advertised members that cannot be reached from "
         r"here: (.+)", r"列出的主机有应答，但它们通告的成员从这里无法访问：\1"),
        (r"it is (\w+)", r"任务状态为 \1"),
        (r"the forward task is (\w+)", r"正向任务状态为 \1"),
        (r"no privilege on db_name (.+), or no such database \(the server does not say which\)",
         r"对 db_name \1 没有权限，或该数据库不存在（服务器不区分这两种情况）"),
        (r"(.+); the server presented (.+), issued by (.+), valid until (\S+)",
         r"\1；服务器出示的证书为 \2，签发者为 \3，有效期至 \4"),
        (r"the server presented (.+), issued by (.+), valid until (\S+)",
         r"服务器出示的证书为 \1，签发者为 \2，有效期至 \3"),
    )
)


def cause_zh(cause: str) -> str:
    """`cause` in Chinese when probe wrote it; driver and server text as it came."""
    zh = _ZH_CAUSES.get(cause)
    if zh is not None:
        return zh
    for pattern, template in _ZH_PATTERNS:
        match = pattern.fullmatch(cause)
        if match is not None:
            return match.expand(template)
    return cause


def render(
    code: ErrorCode,
    lang: Language = "en-us",
    *,
    target: str = "",
    field: str = "",
    cause: str = "",
) -> str:
    """The message for `code` in `lang`.

    `cause` is appended as ``: cause`` (``：cause``), or as it is when it starts
    with its own separator (``;``).
    """
    entry = CATALOG[code]
    template = entry.zh if lang == "zh-cn" else entry.en
    if cause and lang == "zh-cn":
        cause = cause_zh(cause)
    if cause and not cause.startswith((";", "；")):
        cause = ("：" if lang == "zh-cn" else ": ") + cause
    return template.format(target=target or "the endpoint", field=field, cause=cause)


# DRS.C10099 when the prober hit a limit of its own (file descriptors, memory, local
# ports, the batch deadline): the message must not leave the user thinking the target failed.
_LOCAL_LIMIT = CatalogEntry(
    200,
    "The prober reached a limit of its own while testing {target}{cause}. This is a "
    "limit of the prober itself, not a fault of the target: retry with fewer endpoints at "
    "once or raise the prober's limits.",
    "测试 {target} 时达到了探测端自身的限制{cause}。这是探测端自身的限制，不是目标的故障："
    "请减少同时测试的端点数量或提高探测端的资源上限后重试。",
)


class ProbeFailure(Exception):
    """Raised when probing one endpoint failed; `code` says how.

    `local` marks a DRS.C10099 caused by the prober's own resource limits
    (EMFILE and the like); its message says so, and names the resource.
    """

    def __init__(
        self, code: ErrorCode, *, target: str = "", cause: str = "", local: bool = False
    ) -> None:
        super().__init__(code.value)
        self.code = code
        self.target = target
        self.cause = cause
        self.local = local and code is ErrorCode.INTERNAL

    def message(self, lang: Language = "en-us") -> str:
        if self.local:
            entry = _LOCAL_LIMIT
            cause = ("：" if lang == "zh-cn" else ": ") + self.cause if self.cause else ""
            template = entry.zh if lang == "zh-cn" else entry.en
            return template.format(target=self.target or "the endpoint", cause=cause)
        return render(self.code, lang, target=self.target, cause=self.cause)

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message()}"

    def __repr__(self) -> str:
        return f"ProbeFailure({self.code.value}, target={self.target!r})"


class RequestInvalid(Exception):
    """Raised when a request, or one job of it, breaks the contract; `field` names the path."""

    def __init__(
        self, code: ErrorCode, *, field: str = "", cause: str = "", job_id: str = ""
    ) -> None:
        super().__init__(code.value)
        self.code = code
        self.field = field
        self.cause = cause
        self.job_id = job_id  # the id of the invalid job, when it had a usable one

    @property
    def http_status(self) -> int:
        return CATALOG[self.code].http_status

    others: int = 0  # further invalid jobs of the same request (strict validation)

    def message(self, lang: Language = "en-us") -> str:
        text = render(self.code, lang, field=self.field, cause=self.cause)
        if self.others:
            text += (f"（另有 {self.others} 个任务无效）" if lang == "zh-cn"
                     else f" ({self.others} more invalid {'job' if self.others == 1 else 'jobs'})")
        return text

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message()}"


_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]*@")


def scrub(text: str, *secrets: str | None) -> str:
    """`text` with every secret, and any ``scheme://user:pass@`` userinfo, masked.

    Drivers sometimes echo a DSN or the password in their messages; every
    driver message passes through here before it becomes a cause.
    """
    if "://" in text:
        text = _URL_USERINFO.sub("***@", text)
    lowered = text.lower()
    masked = sorted({s for s in secrets if s and len(s) >= 3
                     and (not s.isascii() or s.lower() in lowered)},  # skip compiling a miss
                    key=len, reverse=True)
    if masked:  # longest first (one may hold another); any case (resolvers lowercase names)
        text = re.sub("|".join(map(re.escape, masked)), "***", text, flags=re.IGNORECASE)
    return text
